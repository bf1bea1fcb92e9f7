import { ObjectNames } from '../store/blobstore.js';
import type { GcCandidate } from '../index/records.js';
import { isStale, LockNames, withLock } from './locks.js';
import type { Repository } from './repository.js';

export interface CleanupResult {
  /** Blocks and stray objects newly found unreferenced (deleted by a later run once the grace period is over). */
  marked: number;
  /** Candidates that a version references again, taken off the list. */
  unmarked: number;
  /** Objects deleted, and the stored bytes that freed. */
  deleted: number;
  bytes_freed: number;
  /** Candidates still inside their grace period. */
  waiting: number;
  grace_ms: number;
  temp_files_removed: number;
}

const DELETE_BATCH = 1000;
/** marked_at of a candidate whose mark is not visible yet: never old enough to be swept. */
const NOT_YET = Number.MAX_SAFE_INTEGER;

/**
 * Frees the space of blocks that no version references, safely while backups run. Protocol:
 *
 * 1. Mark: every block map (complete and incomplete versions) is streamed into a reference set kept in
 *    LMDB (memory does not grow with the repository). Unreferenced blocks, and objects in the store the
 *    index does not know (left by killed backups), become candidates with the time they were marked.
 * 2. Sweep: a candidate marked at least the grace period before this pass's mark began, and still
 *    unreferenced, is doomed in one transaction (its block record goes), its object deleted, then forgotten.
 *
 * A writer (backup, copy, import) that is about to deduplicate against, reference or write a candidate first
 * takes it off the list (`BlockPipeline.retain`, a synchronous transaction ordered against the doom
 * transaction), or waits while it is being deleted and then writes it anew. A writer that picked up a block
 * before it became a candidate started before it was marked: while such a writer runs, the candidate is not
 * swept (writers hold volume locks, which tell their start time). Its commit adds the reference, which the
 * next pass sees. The grace period adds a margin for writers on other machines (S3), which hold no local
 * lock. Killing a cleanup at any moment is safe: doomed candidates are finished by the next run. With a grace
 * period of 0 the command runs two passes.
 */
export async function cleanup(repo: Repository, graceMs: number): Promise<CleanupResult> {
  return withLock(repo.index, LockNames.cleanup, 'exclusive', 'Cleanup', async () => {
    const result: CleanupResult = { marked: 0, unmarked: 0, deleted: 0, bytes_freed: 0, waiting: 0, grace_ms: graceMs, temp_files_removed: 0 };
    await finishDoomed(repo, result);
    for (let pass = 0; pass < (graceMs === 0 ? 2 : 1); pass++) await runPass(repo, graceMs, result);
    result.temp_files_removed = (await repo.store.removeStaleTemp?.(Math.max(graceMs, 3600_000))) ?? 0;
    await repo.index.clearGcRefs();
    return result;
  });
}

async function runPass(repo: Repository, graceMs: number, result: CleanupResult): Promise<void> {
  const index = repo.index;
  const markStart = Date.now();
  // Writers (backups, copies, imports) running now may hold references not yet committed.
  const oldestWriter = oldestRunningWriter(repo);
  await collectReferences(repo);

  // Candidates referenced again are no longer garbage.
  const revived: Buffer[] = [];
  const existing = new Set<string>();
  for (const { checksum, candidate } of index.allGcCandidates()) {
    if (!candidate.doomed && index.isGcRef(checksum)) revived.push(checksum);
    else existing.add(checksum.toString('hex'));
  }
  await index.removeGcCandidates(revived);
  result.unmarked += revived.length;

  // New candidates: unreferenced blocks of the index, then objects the index does not know.
  const fresh: [Buffer, GcCandidate][] = [];
  for (const { checksum, record } of index.allBlocks()) {
    if (!index.isGcRef(checksum) && !existing.has(checksum.toString('hex'))) fresh.push([checksum, { marked_at: NOT_YET, doomed: false, stored: record.stored }]);
  }
  for await (const name of repo.store.list(ObjectNames.blockPrefix)) {
    const hex = name.slice(name.lastIndexOf('/') + 1);
    if (!/^[0-9a-f]{64}$/.test(hex) || existing.has(hex)) continue;
    const checksum = Buffer.from(hex, 'hex');
    if (index.getBlock(checksum) || index.isGcRef(checksum)) continue;
    fresh.push([checksum, { marked_at: NOT_YET, doomed: false, stored: (await repo.store.size(name)) ?? 0 }]);
  }
  // The mark time is taken once the candidates are visible: a writer starting later sees them and rescues
  // what it uses (until then they carry a time that is never swept).
  await index.putGcCandidates(fresh);
  const visible = Date.now();
  for (const [, c] of fresh) c.marked_at = visible;
  await index.putGcCandidates(fresh);
  result.marked += fresh.length;

  // Sweep what has waited long enough, and only what no writer running at the reference scan can have
  // picked up before it became a candidate (such a writer started before the candidate was marked).
  const cutoff = Math.min(markStart - graceMs, oldestWriter - 1);
  const due: Buffer[] = [];
  let waiting = 0;
  for (const { checksum, candidate } of index.allGcCandidates()) {
    if (candidate.doomed) continue;
    if (candidate.marked_at <= cutoff) due.push(checksum);
    else waiting++;
  }
  result.waiting = waiting;
  for (let i = 0; i < due.length; i += DELETE_BATCH) {
    await index.doomGcCandidates(due.slice(i, i + DELETE_BATCH), cutoff);
    await finishDoomed(repo, result);
  }
}

/** Start time of the oldest live writer holding a volume lock (Infinity when none runs). */
function oldestRunningWriter(repo: Repository): number {
  let oldest = Infinity;
  for (const l of repo.index.allLocks()) {
    if (l.resource.startsWith('volume:') && !isStale(l)) oldest = Math.min(oldest, Date.parse(l.started));
  }
  return oldest;
}

/** Deletes the objects of doomed candidates (also those a killed cleanup left) and forgets them. */
async function finishDoomed(repo: Repository, result: CleanupResult): Promise<void> {
  const doomed: { checksum: Buffer; stored: number }[] = [];
  for (const { checksum, candidate } of repo.index.allGcCandidates()) if (candidate.doomed) doomed.push({ checksum, stored: candidate.stored });
  for (let i = 0; i < doomed.length; i += DELETE_BATCH) {
    const batch = doomed.slice(i, i + DELETE_BATCH);
    await repo.store.delete(batch.map((d) => ObjectNames.block(d.checksum.toString('hex'))));
    await repo.store.sync();
    await repo.index.removeGcCandidates(batch.map((d) => d.checksum));
    result.deleted += batch.length;
    result.bytes_freed += batch.reduce((n, d) => n + d.stored, 0);
  }
}

/** Streams every block map into the LMDB reference set. */
async function collectReferences(repo: Repository): Promise<void> {
  await repo.index.clearGcRefs();
  for (const v of repo.index.allVersions()) {
    const blocks = Math.ceil(v.size / v.block_size);
    const cursor = repo.index.mapCursor(v.id);
    let batch: Buffer[] = [];
    for (let i = 0; i < blocks; i++) {
      const c = cursor.get(i);
      if (c) batch.push(c);
      if (batch.length >= 4096) {
        await repo.index.addGcRefs(batch);
        batch = [];
      }
    }
    await repo.index.addGcRefs(batch);
  }
}
