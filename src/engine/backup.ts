import { randomInt } from 'node:crypto';
import { BlocksafeError, NotFoundError, RefusedError, UsageError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import type { Throttle } from '../util/throttle.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { inspectSource, sourcePath, type DeviceInfo } from './device.js';
import { blockHints, type BlockHint, type Extent } from './hints.js';
import { LockNames, withLock } from './locks.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';
import { SourceReader } from './sourceReader.js';
import { withVersionWriter, type BlockOutcome, type VersionWriter } from './versionWriter.js';

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
    if (v.name === name && !v.complete && !v.removing && (!best || v.date > best.date)) best = v;
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
  return withLock(repo.locks, LockNames.volume(opts.name), 'exclusive', `Volume "${opts.name}"`, () => runBackup(repo, pipeline, opts));
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
  if (resume) checkResumable(resume, opts.name, info.size, repo.blockSize);
  const base = resolveBase(repo, opts, resume);
  if (opts.hints && !base) throw new UsageError(`--hints needs a base version: give --from VERSION (no complete version of "${opts.name}" exists yet).`);
  const fields = { name: opts.name, size: info.size, source: opts.sourceLabel ?? opts.source, snapshotName: opts.snapshotName, tags: opts.tags, base: base?.id ?? null };
  const run = () => withVersionWriter(repo, pipeline, resume ?? fields, (writer) => runBackupOn(repo, pipeline, opts, info, writer, base));
  // The base must not be removed while blocks are taken from it.
  return base ? withLock(repo.locks, LockNames.version(base.id), 'shared', `Version ${base.id}`, run) : run();
}

async function runBackupOn(repo: Repository, pipeline: BlockPipeline, opts: BackupOptions, info: DeviceInfo, writer: VersionWriter, base: VersionRecord | null): Promise<VersionRecord> {
  const bs = repo.blockSize;
  const blocks = writer.blocks;
  const hints = opts.hints && base ? blockHints(opts.hints, bs, info.size) : null;
  const baseBlocks = base ? Math.ceil(base.size / bs) : 0;
  const baseCursor = base ? repo.index.mapCursor(base.id, baseBlocks) : null;
  // Only blocks covering the same bytes in both can be compared (a grown or shrunk last block cannot).
  let comparable = Math.min(blocks, baseBlocks);
  if (comparable > 0 && Math.min(bs, info.size - (comparable - 1) * bs) !== Math.min(bs, (base?.size ?? 0) - (comparable - 1) * bs)) comparable--;
  const samples = hints ? pickSamples(comparable, hints) : new Set<number>();
  const reader = await SourceReader.open(info.path, { blockSize: bs, slots: 0, direct: opts.direct, throttle: opts.readThrottle });

  /** The base version's entry for block i when it covers exactly the same byte range, else undefined. */
  const baseEntry = (i: number, length: number): Buffer | null | undefined => {
    if (!baseCursor || i >= baseBlocks || Math.min(bs, base!.size - i * bs) !== length) return undefined;
    return baseCursor.get(i);
  };

  /** Reads, checksums and stores block i (through an arena slot); with `expect`, it must equal the base's entry (hints check). */
  const readBlock = async (i: number, length: number, sampled: boolean, expect?: Buffer | null): Promise<BlockOutcome> => {
    const slot = await pipeline.arena.take();
    try {
      await reader.readInto(i * bs, length, pipeline.arena.blockRegion(slot));
      const checksum = await pipeline.digestSlot(slot, length);
      if (expect !== undefined && !(checksum === null ? expect === null : expect !== null && checksum.equals(expect))) {
        throw new HintsMismatchError(
          `The hints file is wrong: block ${i} (offset ${i * bs}) changed since version ${base!.id} but the hints do not name it; ` +
            'no version was created. Back up without --hints (or with correct hints).',
        );
      }
      if (!checksum) return { kind: 'sparse', length, sampled };
      const { record, written } = await pipeline.storeSlot(slot, length, checksum);
      return { kind: 'data', length, checksum, record, written, sampled };
    } finally {
      pipeline.arena.give(slot);
    }
  };

  try {
    await orderedWindow<BlockOutcome>(
      blocks,
      opts.queueDepth,
      async (i) => {
        const length = Math.min(bs, info.size - i * bs);
        const hint: BlockHint | undefined = hints?.get(i);
        if (hint === 'zero') return { kind: 'sparse', length };
        const fromBase = hints ? baseEntry(i, length) : undefined;
        if (hints && hint === undefined && fromBase !== undefined) {
          // Trust but verify: a sampled untouched block must equal the base's.
          if (samples.has(i)) return readBlock(i, length, true, fromBase);
          if (fromBase === null) return { kind: 'sparse', length };
          await pipeline.retain(fromBase);
          // Blocks a scrub marked invalid are always re-read: that is how the next backup heals them.
          if (repo.index.getBlock(fromBase)?.valid) return { kind: 'referenced', length, checksum: fromBase };
        }
        return readBlock(i, length, false);
      },
      async (i, out) => {
        await writer.record(i, out);
        opts.onProgress?.({ phase: 'backup', doneBytes: Math.min(info.size, (i + 1) * bs), totalBytes: info.size, damaged: 0 });
      },
      writer.first,
      0, // slot-based: nothing per block for the garbage collector
    );
  } catch (err) {
    if (err instanceof HintsMismatchError) await writer.abandon();
    throw err;
  } finally {
    await reader.close();
  }
  return writer.finish({ autoTags: opts.autoTags });
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

function resolveBase(repo: Repository, opts: BackupOptions, resume: VersionRecord | null): VersionRecord | null {
  if (resume) {
    const base = resume.base ? (repo.index.getVersion(resume.base) ?? null) : null;
    if (opts.from && opts.from.id !== base?.id) {
      throw new UsageError(`The interrupted version ${resume.id} was based on ${resume.base ?? 'no version'}, not ${opts.from.id}; resume without --from.`);
    }
    return base;
  }
  if (opts.from === undefined) return newestComplete(repo, opts.name);
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
