import { IntegrityError, LockedError } from '../errors.js';
import type { GcCandidate } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import { now } from '../util/clock.js';
import { formatDuration } from '../util/time.js';
import { isVersionId } from './ids.js';
import { blockChecksumOf, readGcGeneration, writeGcGeneration } from './indexSync.js';
import { describeLease } from './leases.js';
import { describeHolder, LockNames, withLock, type Lock } from './locks.js';
import { tryReadManifest } from './manifest.js';
import type { Repository } from './repository.js';
import { pausePoint } from '../util/pause.js';

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
  /** Why nothing was deleted this time although candidates were due (a writer on another machine), or null. */
  sweep_postponed: string | null;
}

const DELETE_BATCH = 1000;
/** marked_at of a candidate whose mark is not visible yet: never old enough to be swept. */
const NOT_YET = Number.MAX_SAFE_INTEGER;
/**
 * The smallest grace period allowed while anything writes versions. Below it (`--grace 0` in tests and
 * one-off maintenance) cleanup refuses unless no writer runs anywhere. PBS keeps 24 h + 5 min; our default
 * is 24 h, and the writer cutoff below does not depend on it.
 */
export const GRACE_FLOOR_MS = 3600_000;

/**
 * Frees the space of blocks that no version references, safely while backups run. The store is the
 * authority: what its manifests reference is never deleted, whatever the index says.
 *
 * Each pass:
 * 1. Mark: the references of every version are streamed into a reference set kept in LMDB (memory does not
 *    grow with the repository): interrupted versions from the index first, then every manifest the store
 *    lists (its block map from the index when the index holds that complete version, authenticated, else
 *    read from the store). Any manifest that cannot be read fails the whole cleanup (fail closed).
 *    Unreferenced blocks, and objects in the store the index does not know (left by killed backups), become
 *    candidates with the time they were marked.
 * 2. Sweep, holding the `sweep` lease: a candidate marked at least the grace period before this pass's mark
 *    began, and before the oldest writer of this index started, and unreferenced now, is doomed in one
 *    transaction (its block record goes), its object deleted, then forgotten. The store's `gc/generation`
 *    is raised before the first deletion, so other indexes drop their records of deleted blocks.
 *
 * Writers sharing this index (every process of a directory repository) see the candidates: one that is
 * about to deduplicate against, reference or write a candidate first takes it off the list
 * (`BlockPipeline.retain`, a synchronous transaction ordered against the doom transaction), or waits while
 * it is being deleted and then writes it anew; a writer that picked up a block before it became a candidate
 * started before it was marked, so the cutoff spares it. Writers of other indexes (other machines on one
 * bucket) cannot see the candidates, so sweeping waits for them to finish (leases.ts: `sweep` conflicts
 * with their `writer`). Killing a cleanup at any moment is safe: doomed candidates are finished by the next
 * run, after it marked again. With a grace period of 0 the command runs two passes.
 */
export async function cleanup(repo: Repository, graceMs: number): Promise<CleanupResult> {
  return withLock(repo.locks, LockNames.cleanup, 'exclusive', 'Cleanup', async () => {
    if (graceMs < GRACE_FLOOR_MS) await refuseShortGraceWithWriters(repo, graceMs);
    const result: CleanupResult = { marked: 0, unmarked: 0, deleted: 0, bytes_freed: 0, waiting: 0, grace_ms: graceMs, temp_files_removed: 0, sweep_postponed: null };
    for (let pass = 0; pass < (graceMs === 0 ? 2 : 1); pass++) await runPass(repo, graceMs, result);
    result.temp_files_removed = (await repo.store.removeStaleTemp?.(Math.max(graceMs, 3600_000))) ?? 0;
    await repo.index.clearGcRefs();
    return result;
  });
}

/** A short grace period is for a repository where nothing writes: any writer, here or elsewhere, refuses it. */
async function refuseShortGraceWithWriters(repo: Repository, graceMs: number): Promise<void> {
  const why = (holder: string) =>
    new LockedError(
      `A grace period of ${formatDuration(graceMs)} (below ${formatDuration(GRACE_FLOOR_MS)}) is only allowed while nothing writes to the repository, but ${holder} is writing; nothing was deleted. Use a longer --grace, or wait.`,
    );
  const local = repo.locks.liveLocks((r) => r === LockNames.writer);
  if (local.length > 0) throw why(describeHolder(local[0]!));
  const remote = (await repo.locks.leases?.others()) ?? [];
  const writer = remote.find((l) => l.body.resources.some((r) => r.resource === LockNames.writer));
  if (writer) throw why(describeLease(writer.body));
}

async function runPass(repo: Repository, graceMs: number, result: CleanupResult): Promise<void> {
  const index = repo.index;
  // Sweeping excludes writers of other indexes; without it this pass only marks.
  let sweep: Lock | null = null;
  if (repo.locks.leases) {
    try {
      sweep = await repo.locks.acquire(LockNames.sweep, 'exclusive', 'Deleting unreferenced objects', { storeOnly: true });
    } catch (err) {
      if (!(err instanceof LockedError)) throw err;
      result.sweep_postponed = err.message;
    }
  }
  try {
    const markStart = now();
    // Writers of this index running now may hold references not yet committed.
    const oldestWriter = Math.min(Infinity, ...repo.locks.liveLocks((r) => r === LockNames.writer).map((l) => Date.parse(l.started)));
    await collectReferences(repo);

    // Candidates referenced again are no longer garbage (doomed ones too: a killed cleanup's leftovers).
    const revived: Buffer[] = [];
    const existing = new Set<string>();
    for (const { checksum } of index.allGcCandidates()) {
      if (index.isGcRef(checksum)) revived.push(checksum);
      else existing.add(checksum.toString('hex'));
    }
    await index.removeGcCandidates(revived);
    result.unmarked += revived.length;

    // New candidates: unreferenced blocks of the index, then objects the index does not know.
    const fresh: [Buffer, GcCandidate][] = [];
    for (const { checksum, record } of index.allBlocks()) {
      if (!index.isGcRef(checksum) && !existing.has(checksum.toString('hex'))) fresh.push([checksum, { marked_at: NOT_YET, doomed: false, stored: record.stored }]);
    }
    for await (const e of repo.store.list(ObjectNames.blockPrefix)) {
      const checksum = blockChecksumOf(e.name);
      if (!checksum || existing.has(checksum.toString('hex'))) continue;
      if (index.getBlock(checksum) || index.isGcRef(checksum)) continue;
      fresh.push([checksum, { marked_at: NOT_YET, doomed: false, stored: e.size }]);
    }
    // The mark time is taken once the candidates are visible: a writer starting later sees them and rescues
    // what it uses (until then they carry a time that is never swept).
    await index.putGcCandidates(fresh);
    const visible = now();
    for (const [, c] of fresh) c.marked_at = visible;
    await index.putGcCandidates(fresh);
    result.marked += fresh.length;
    await pausePoint('cleanup.marked');

    // Sweep what has waited long enough, and only what no writer running at the reference scan can have
    // picked up before it became a candidate (such a writer started before the candidate was marked).
    const cutoff = Math.min(markStart - graceMs, oldestWriter - 1);
    const due: Buffer[] = [];
    let waiting = 0;
    let doomed = 0;
    for (const { checksum, candidate } of index.allGcCandidates()) {
      if (candidate.doomed) doomed++;
      else if (candidate.marked_at <= cutoff) due.push(checksum);
      else waiting++;
    }
    result.waiting = waiting + (sweep ? 0 : due.length);
    if (!sweep || (due.length === 0 && doomed === 0)) return;
    result.sweep_postponed = null;
    await pausePoint('cleanup.sweep');
    // Other indexes must learn that objects are going before the first one goes.
    const generation = (await readGcGeneration(repo)) + 1;
    await writeGcGeneration(repo, generation);
    await index.putMeta('gc_generation', generation);
    await finishDoomed(repo, result);
    for (let i = 0; i < due.length; i += DELETE_BATCH) {
      repo.locks.assertHealthy();
      await index.doomGcCandidates(due.slice(i, i + DELETE_BATCH), cutoff);
      await finishDoomed(repo, result);
    }
  } finally {
    await sweep?.release();
  }
}

/** Deletes the objects of doomed candidates (also those a killed cleanup left) and forgets them. */
async function finishDoomed(repo: Repository, result: CleanupResult): Promise<void> {
  const doomed: { checksum: Buffer; stored: number }[] = [];
  for (const { checksum, candidate } of repo.index.allGcCandidates()) if (candidate.doomed && !repo.index.isGcRef(checksum)) doomed.push({ checksum, stored: candidate.stored });
  for (let i = 0; i < doomed.length; i += DELETE_BATCH) {
    const batch = doomed.slice(i, i + DELETE_BATCH);
    await repo.store.delete(batch.map((d) => ObjectNames.block(d.checksum.toString('hex'))));
    await repo.store.sync();
    await repo.index.removeGcCandidates(batch.map((d) => d.checksum));
    result.deleted += batch.length;
    result.bytes_freed += batch.reduce((n, d) => n + d.stored, 0);
  }
}

/**
 * Streams every reference into the LMDB reference set: the index's interrupted versions first, then every
 * manifest in the store (in that order, so a version completing meanwhile is seen either way). Fails
 * closed: a manifest that exists but cannot be read stops the cleanup before anything is deleted.
 */
async function collectReferences(repo: Repository): Promise<void> {
  const { index } = repo;
  await index.clearGcRefs();
  const addMap = async (id: string, blocks: number, get: (i: number) => Buffer | null) => {
    let batch: Buffer[] = [];
    for (let i = 0; i < blocks; i++) {
      const c = get(i);
      if (c) batch.push(c);
      if (batch.length >= 4096) {
        await index.addGcRefs(batch);
        batch = [];
      }
    }
    await index.addGcRefs(batch);
    void id;
  };
  for (const v of index.allVersions()) {
    if (v.complete) continue;
    // blocks_done covers what is committed; the chunk being written may hold more (committed with it).
    const cursor = index.mapCursor(v.id, v.blocks_done);
    await addMap(v.id, Math.min(Math.ceil(v.size / v.block_size), Math.ceil(v.blocks_done / 1024) * 1024), (i) => cursor.get(i));
  }
  const listed: string[] = [];
  for await (const e of repo.store.list(ObjectNames.manifestPrefix)) {
    const id = e.name.slice(ObjectNames.manifestPrefix.length);
    if (isVersionId(id)) listed.push(id);
  }
  for (const id of listed) {
    const v = index.getVersion(id);
    if (v?.complete) {
      const blocks = Math.ceil(v.size / v.block_size);
      const cursor = index.mapCursor(id, blocks);
      await addMap(id, blocks, (i) => cursor.get(i));
      continue;
    }
    let manifest;
    try {
      manifest = await tryReadManifest(repo, id);
    } catch (err) {
      if (err instanceof IntegrityError) {
        throw new IntegrityError(
          `Cleanup stopped before deleting anything: the manifest of version ${id} cannot be read (${err.message}); its blocks might be deleted otherwise. Check the repository (scrub, index rebuild).`,
        );
      }
      throw err;
    }
    if (!manifest) continue; // removed meanwhile
    await addMap(id, manifest.header.blocks, (i) => {
      const c = manifest.map.subarray(i * 32, i * 32 + 32);
      return c.some((b) => b !== 0) ? Buffer.from(c) : null;
    });
  }
}
