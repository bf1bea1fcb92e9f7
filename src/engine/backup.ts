import { randomInt } from 'node:crypto';
import { BlocksafeError, NotFoundError, RefusedError, UsageError } from '../errors.js';
import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import { emptyStats, type BlockRecord, type VersionRecord } from '../index/records.js';
import type { Throttle } from '../util/throttle.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { inspectSource, sourcePath, type DeviceInfo } from './device.js';
import { blockHints, type BlockHint, type Extent } from './hints.js';
import { newVersionId } from './ids.js';
import { revalidateVersions } from './integrity.js';
import { autoTagsFor, syncValidity, writeAttributes } from './lifecycle.js';
import { LockNames, withLock } from './locks.js';
import { writeManifest } from './manifest.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';
import { SourceReader } from './sourceReader.js';

export interface BackupOptions {
  /** Path or file:// URI of the file or block device to read. */
  source: string;
  /** What to record as the version's source, when it differs from `source` (e.g. lvm://vg/lv). */
  sourceLabel?: string;
  name: string;
  snapshotName?: string;
  tags?: string[];
  /** Base version: explicit, null for none, undefined for the newest complete version of `name`. */
  from?: VersionRecord | null;
  /** Changed extents since `from`; blocks outside them are taken from the base without reading. */
  hints?: Extent[] | null;
  /** Continue the interrupted (incomplete) backup of `name`; an error when there is none. */
  resume?: boolean;
  /** Without `resume`: asked whether to continue an interrupted backup of `name` instead of starting anew. */
  offerResume?: (interrupted: VersionRecord) => boolean;
  queueDepth: number;
  /** Read with O_DIRECT where the source allows it. */
  direct: boolean;
  /** Add backy2's automatic b_daily / b_weekly / b_monthly tags. */
  autoTags?: boolean;
  readThrottle?: Throttle;
  onProgress?: ProgressListener;
}

type BlockOutcome =
  | { kind: 'sparse'; length: number; read: boolean; sampled?: boolean }
  | { kind: 'referenced'; length: number; checksum: Buffer }
  | { kind: 'data'; length: number; checksum: Buffer; record: BlockRecord; written: boolean; sampled?: boolean };

/**
 * New block records and map chunks are committed to the index in groups — after this many blocks or this
 * much time, whichever comes first — so an interrupted backup loses at most about a second of reading.
 */
const COMMIT_EVERY_BLOCKS = 64;
const COMMIT_EVERY_MS = 1000;
/** Hints are checked by re-reading this many untouched blocks (at least), or this fraction of them. */
const SAMPLE_MIN = 10;
const SAMPLE_FRACTION = 0.001;

export class HintsMismatchError extends BlocksafeError {}

/** The newest complete version of a volume name, or null. */
export function newestComplete(repo: Repository, name: string, exceptId?: string): VersionRecord | null {
  let best: VersionRecord | null = null;
  for (const v of repo.index.allVersions()) {
    if (v.name !== name || !v.complete || v.id === exceptId) continue;
    if (!best || v.date > best.date) best = v;
  }
  return best;
}

/** The newest incomplete (interrupted) version of a volume name, or null. */
export function newestIncomplete(repo: Repository, name: string): VersionRecord | null {
  let best: VersionRecord | null = null;
  for (const v of repo.index.allVersions()) {
    if (v.name === name && !v.complete && (!best || v.date > best.date)) best = v;
  }
  return best;
}

/**
 * Backs up a file or block device as a new version (or continues an interrupted one). The version is
 * recorded as incomplete first; block objects are durable before the index refers to them; progress is
 * committed in groups so that a resume re-reads nothing that was committed; the version becomes complete
 * only after its manifest is durable. The volume name is locked for the duration.
 */
export async function backup(repo: Repository, pipeline: BlockPipeline, opts: BackupOptions): Promise<VersionRecord> {
  validateName(opts.name);
  return withLock(repo.index, LockNames.volume(opts.name), 'exclusive', `Volume "${opts.name}"`, () => runBackup(repo, pipeline, opts));
}

/** The interrupted version to continue, if any; checked under the volume lock so a running backup is not "interrupted". */
function pickResume(repo: Repository, opts: BackupOptions): VersionRecord | null {
  const interrupted = newestIncomplete(repo, opts.name);
  if (opts.resume) {
    if (!interrupted) throw new NotFoundError(`There is no interrupted backup of "${opts.name}" to resume; run the backup without --resume.`);
    return interrupted;
  }
  return interrupted && opts.offerResume?.(interrupted) ? interrupted : null;
}

async function runBackup(repo: Repository, pipeline: BlockPipeline, opts: BackupOptions): Promise<VersionRecord> {
  const path = sourcePath(opts.source);
  const info = await inspectSource(path);
  const resume = pickResume(repo, opts);
  const version = resume ? checkResumable(resume, opts.name, info.size, repo.blockSize) : newVersion(repo, opts, info.size);
  const base = resolveBase(repo, opts, version, resume);
  if (opts.hints && !base) throw new UsageError(`--hints needs a base version: give --from VERSION (no complete version of "${opts.name}" exists yet).`);
  // The base must not be removed while blocks are taken from it.
  if (base) return withLock(repo.index, LockNames.version(base.id), 'shared', `Version ${base.id}`, () => runBackupOn(repo, pipeline, opts, info, version, base));
  return runBackupOn(repo, pipeline, opts, info, version, base);
}

async function runBackupOn(
  repo: Repository,
  pipeline: BlockPipeline,
  opts: BackupOptions,
  info: DeviceInfo,
  version: VersionRecord,
  base: VersionRecord | null,
): Promise<VersionRecord> {
  const path = info.path;
  const bs = repo.blockSize;
  const blocks = Math.ceil(info.size / bs);
  version.base = base?.id ?? null;
  const hints = opts.hints && base ? blockHints(opts.hints, bs, info.size) : null;
  const baseBlocks = base ? Math.ceil(base.size / bs) : 0;
  const baseCursor = base ? repo.index.mapCursor(base.id) : null;
  const samples = hints ? pickSamples(Math.min(blocks, baseBlocks), hints) : new Set<number>();
  await repo.index.putVersion(version);

  const reader = await SourceReader.open(path, { blockSize: bs, slots: opts.queueDepth, direct: opts.direct, throttle: opts.readThrottle });
  const started = Date.now();
  const previousDuration = version.stats.duration_ms;
  const stats = version.stats;
  const first = version.blocks_done;
  let chunkNo = Math.floor(first / CHUNK_BLOCKS);
  let chunk = repo.index.getChunk(version.id, chunkNo) ?? BlockMapChunk.empty();
  let pendingBlocks = new Map<string, [Buffer, BlockRecord]>();
  let sinceCommit = 0;
  let lastCommit = Date.now();

  const commit = async () => {
    await repo.store.sync(); // objects durable before the index refers to them
    const records = [...pendingBlocks.values()];
    stats.duration_ms = previousDuration + Date.now() - started;
    await repo.index.commitProgress(version, records, [[chunkNo, chunk]]);
    pipeline.committed(records.map(([c]) => c));
    pendingBlocks = new Map();
    sinceCommit = 0;
    lastCommit = Date.now();
  };

  /** The base version's entry for block i when it covers exactly the same byte range, else undefined. */
  const baseEntry = (i: number, length: number): Buffer | null | undefined => {
    if (!baseCursor || i >= baseBlocks || Math.min(bs, base!.size - i * bs) !== length) return undefined;
    return baseCursor.get(i);
  };

  const readBlock = async (i: number, length: number): Promise<{ checksum: Buffer | null; data: Buffer }> => {
    const { data, checksum } = await pipeline.digest(await reader.read(i * bs, length));
    return { data, checksum };
  };

  try {
    await orderedWindow<BlockOutcome>(
      blocks,
      opts.queueDepth,
      async (i) => {
        const length = Math.min(bs, info.size - i * bs);
        const hint: BlockHint | undefined = hints?.get(i);
        const fromBase = hints ? baseEntry(i, length) : undefined;
        if (hint === 'zero') return { kind: 'sparse', length, read: false };
        if (hints && hint === undefined && fromBase !== undefined) {
          if (samples.has(i)) {
            // Trust but verify: an untouched block must equal the base's.
            const { data, checksum } = await readBlock(i, length);
            if (!(checksum === null ? fromBase === null : fromBase !== null && checksum.equals(fromBase))) {
              throw new HintsMismatchError(
                `The hints file is wrong: block ${i} (offset ${i * bs}) changed since version ${base!.id} but the hints do not name it; ` +
                  'no version was created. Back up without --hints (or with correct hints).',
              );
            }
            if (checksum === null) return { kind: 'sparse', length, read: true, sampled: true };
            const { record, written } = await pipeline.store(data, checksum);
            return { kind: 'data', length, checksum, record, written, sampled: true };
          }
          if (fromBase === null) return { kind: 'sparse', length, read: false };
          await pipeline.retain(fromBase);
          const rec = repo.index.getBlock(fromBase);
          // Blocks a scrub marked invalid are always re-read: that is how the next backup heals them.
          if (rec?.valid) return { kind: 'referenced', length, checksum: fromBase };
        }
        const { data, checksum } = await readBlock(i, length);
        if (!checksum) return { kind: 'sparse', length, read: true };
        const { record, written } = await pipeline.store(data, checksum);
        return { kind: 'data', length, checksum, record, written };
      },
      async (i, out) => {
        const slot = i % CHUNK_BLOCKS;
        if (slot === 0 && i > first) {
          // the previous chunk is full: commit it before starting the next
          await commit();
          chunk = BlockMapChunk.empty();
          chunkNo = i / CHUNK_BLOCKS;
        }
        if (out.kind !== 'referenced' && out.sampled) stats.blocks_sampled++;
        switch (out.kind) {
          case 'sparse':
            stats.blocks_sparse++;
            stats.bytes_sparse += out.length;
            chunk.set(slot, null);
            break;
          case 'referenced':
            stats.blocks_referenced++;
            stats.blocks_deduplicated++;
            stats.bytes_deduplicated += out.length;
            chunk.set(slot, out.checksum);
            break;
          case 'data':
            stats.blocks_read++;
            stats.bytes_read += out.length;
            chunk.set(slot, out.checksum);
            if (out.written) {
              stats.blocks_written++;
              stats.bytes_written += out.record.stored;
              pendingBlocks.set(out.checksum.toString('hex'), [out.checksum, out.record]);
            } else {
              stats.blocks_deduplicated++;
              stats.bytes_deduplicated += out.length;
            }
        }
        version.blocks_done = i + 1;
        sinceCommit++;
        if (sinceCommit >= COMMIT_EVERY_BLOCKS || Date.now() - lastCommit >= COMMIT_EVERY_MS) await commit();
        opts.onProgress?.({ phase: 'backup', doneBytes: Math.min(info.size, (i + 1) * bs), totalBytes: info.size, damaged: 0 });
      },
      first,
    );
    await commit();
  } catch (err) {
    if (err instanceof HintsMismatchError) await repo.index.removeVersion(version.id);
    throw err;
  } finally {
    await reader.close();
  }
  // The manifest describes the finished version; only once it is durable does the index say complete.
  if (opts.autoTags) version.tags = [...new Set([...version.tags, ...autoTagsFor(repo, version)])];
  version.complete = true;
  stats.duration_ms = previousDuration + Date.now() - started;
  await writeManifest(repo, version);
  const done = await repo.index.updateVersion(version.id, (v) => {
    v.complete = true;
    v.stats = stats;
    v.blocks_done = blocks;
    v.base = version.base;
    v.tags = version.tags;
  });
  await writeAttributes(repo, done);
  // Blocks re-stored over invalid records may have healed older versions.
  if (stats.blocks_written > 0) await syncValidity(repo, await revalidateVersions(repo));
  return done;
}

function newVersion(repo: Repository, opts: BackupOptions, size: number): VersionRecord {
  let id = newVersionId();
  while (repo.index.hasVersion(id)) id = newVersionId();
  return {
    format: 1,
    id,
    name: opts.name,
    snapshot_name: opts.snapshotName ?? '',
    date: new Date().toISOString(),
    size,
    block_size: repo.blockSize,
    complete: false,
    valid: true,
    protected: false,
    tags: [...new Set(opts.tags ?? [])],
    expire: null,
    blocks_done: 0,
    source: opts.sourceLabel ?? opts.source,
    base: null,
    stats: emptyStats(),
  };
}

function checkResumable(v: VersionRecord, name: string, size: number, blockSize: number): VersionRecord {
  if (v.complete) throw new RefusedError(`Version ${v.id} is complete; there is nothing to resume.`);
  if (v.name !== name) throw new UsageError(`Version ${v.id} belongs to "${v.name}", not "${name}".`);
  if (v.block_size !== blockSize) throw new RefusedError(`Version ${v.id} was made with another block size; start a new backup.`);
  if (v.size !== size) {
    throw new RefusedError(`The source is now ${size} bytes but the interrupted version ${v.id} was ${v.size}; it cannot be resumed, start a new backup.`);
  }
  return v;
}

function resolveBase(repo: Repository, opts: BackupOptions, version: VersionRecord, resume: VersionRecord | null): VersionRecord | null {
  if (resume) {
    const base = resume.base ? (repo.index.getVersion(resume.base) ?? null) : null;
    if (opts.from && opts.from.id !== base?.id) {
      throw new UsageError(`The interrupted version ${version.id} was based on ${resume.base ?? 'no version'}, not ${opts.from.id}; resume without --from.`);
    }
    return base;
  }
  if (opts.from === undefined) return newestComplete(repo, opts.name, version.id);
  if (opts.from && !opts.from.complete) throw new UsageError(`Version ${opts.from.id} is incomplete and cannot be a base; pick a complete version.`);
  return opts.from;
}

/** Random blocks outside the hints (covered by the base) to re-read as a check on the hints. */
function pickSamples(comparable: number, hints: Map<number, BlockHint>): Set<number> {
  const untouched = comparable - [...hints.keys()].filter((b) => b < comparable).length;
  const want = Math.min(untouched, Math.max(SAMPLE_MIN, Math.ceil(untouched * SAMPLE_FRACTION)));
  const out = new Set<number>();
  if (want <= 0) return out;
  if (want === untouched) {
    for (let b = 0; b < comparable; b++) if (!hints.has(b)) out.add(b);
    return out;
  }
  while (out.size < want) {
    const b = randomInt(comparable);
    if (!hints.has(b)) out.add(b);
  }
  return out;
}

export function validateName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$/.test(name)) {
    throw new UsageError(`Invalid volume name "${name}": use letters, digits and . _ @ : + - (at most 128 characters, not starting with a symbol).`);
  }
}
