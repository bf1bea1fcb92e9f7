import { IntegrityError, UsageError } from '../errors.js';
import type { BlockRecord, VersionRecord } from '../index/records.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { inspectSource, sourcePath } from './device.js';
import { markDamaged, revalidateVersions } from './integrity.js';
import { syncValidity } from './lifecycle.js';
import { LockNames, withLock } from './locks.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';
import { SourceReader } from './sourceReader.js';
import { pausePoint } from '../util/pause.js';
import { DEFAULT_CEPH, RbdClient } from './rbd.js';
import { compareWithRbd } from './rbdScrub.js';

export interface ScrubOptions {
  /** Versions to scrub; empty means every block of the repository (--all). */
  versions: VersionRecord[];
  /** Scrub only this percentage of the selected blocks, those verified longest ago (1–100). */
  percent?: number;
  /** Deep scrub: also compare the (single) version with this live source. */
  source?: string;
  queueDepth: number;
  direct: boolean;
  /** Needed for an rbd:// source. */
  rbd?: RbdClient;
  onProgress?: ProgressListener;
}

export interface DamagedBlock {
  checksum: string;
  reason: string;
}

export interface SourceDifference {
  block: number;
  offset: number;
  length: number;
}

export interface ScrubResult {
  blocks_selected: number;
  blocks_checked: number;
  bytes_checked: number;
  damaged: DamagedBlock[];
  /** Versions made invalid by this scrub (and all versions known invalid afterwards). */
  invalidated_versions: string[];
  invalid_versions: string[];
  /** Versions that became valid again because all their blocks verify now. */
  revalidated_versions: string[];
  source_differences: SourceDifference[];
  /** With --percent: blocks still due in the current cycle after this run. */
  blocks_due: number | null;
}

/**
 * Scrub: re-reads stored blocks, authenticates and decompresses them and recomputes their checksums.
 * Each selected block is read once however many versions share it. Damaged blocks are marked invalid
 * with every version that uses them (so the next backup re-stores them); blocks that verify get a new
 * `verified` time, which `--percent` uses to pick the blocks verified longest ago.
 *
 * --percent works in cycles: a block is due when it was last verified before the current cycle began;
 * each run verifies up to N % of all selected blocks among the due ones, oldest first; when none are due, a
 * new cycle begins. So N % a night covers every block exactly once in ceil(100 / N) nights.
 */
export async function scrub(repo: Repository, pipeline: BlockPipeline, opts: ScrubOptions): Promise<ScrubResult> {
  if (opts.percent !== undefined && !(opts.percent > 0 && opts.percent <= 100)) throw new UsageError(`--percent must be between 0 and 100 (got ${opts.percent}).`);
  if (opts.source && opts.versions.length !== 1) throw new UsageError('A deep scrub with --source compares exactly one version with its source; name one version.');
  const locks = opts.versions.map((v) => v.id);
  const run = () => runScrub(repo, pipeline, opts);
  // Hold every named version (shared) so none is removed while it is being scrubbed.
  const hold = locks.reduceRight<() => Promise<ScrubResult>>((inner, id) => () => withLock(repo.locks, LockNames.version(id), 'shared', `Version ${id}`, inner), run);
  return hold();
}

async function runScrub(repo: Repository, pipeline: BlockPipeline, opts: ScrubOptions): Promise<ScrubResult> {
  const selected = selectBlocks(repo, opts.versions);
  let chosen = selected;
  let due: number | null = null;
  if (opts.percent !== undefined) {
    let cycleStart = repo.index.getMeta<number>('scrub_cycle_start') ?? 0;
    let dueBlocks = selected.filter((b) => b.record.verified < cycleStart);
    if (dueBlocks.length === 0) {
      cycleStart = Date.now();
      await repo.index.putMeta('scrub_cycle_start', cycleStart);
      dueBlocks = selected;
    }
    dueBlocks.sort((a, b) => a.record.verified - b.record.verified || a.checksum.compare(b.checksum));
    const quota = Math.ceil((selected.length * opts.percent) / 100);
    chosen = dueBlocks.slice(0, quota);
    due = dueBlocks.length - chosen.length;
  }

  const totalBytes = chosen.reduce((n, b) => n + b.record.size, 0);
  const damaged: DamagedBlock[] = [];
  const damagedChecksums: Buffer[] = [];
  const seen = new Map<string, BlockRecord>();
  // Records are updated only if unchanged since they were read (compare-and-set): a cleanup may have
  // removed a block meanwhile, a backup healed it, a rekey replaced its object.
  const verified: { checksum: Buffer; expect: BlockRecord; next: BlockRecord }[] = [];
  let doneBytes = 0;
  await pausePoint('scrub.started');
  await orderedWindow<string | null>(
    chosen.length,
    opts.queueDepth,
    async (i) => {
      const { checksum, record } = chosen[i]!;
      try {
        await pipeline.load(checksum, record.size);
        return null;
      } catch (err) {
        if (err instanceof IntegrityError) return err.message;
        throw err;
      }
    },
    async (i, error) => {
      const { checksum, record } = chosen[i]!;
      if (error) {
        damaged.push({ checksum: checksum.toString('hex'), reason: error });
        damagedChecksums.push(checksum);
        seen.set(checksum.toString('hex'), record);
      } else {
        verified.push({ checksum, expect: record, next: { ...record, valid: true, verified: Date.now() } });
        if (verified.length >= 256) await repo.index.updateBlocksIf(verified.splice(0));
      }
      doneBytes += record.size;
      opts.onProgress?.({ phase: 'scrub', doneBytes, totalBytes, damaged: damaged.length });
    },
  );
  await pausePoint('scrub.update');
  await repo.index.updateBlocksIf(verified);
  const invalidated = await markDamaged(repo, damagedChecksums, seen);
  const revalidated = await revalidateVersions(repo);
  await syncValidity(repo, [...invalidated, ...revalidated]);
  const differences = !opts.source
    ? []
    : opts.source.startsWith('rbd://')
      ? await compareWithRbd(repo, pipeline, opts.rbd ?? new RbdClient(DEFAULT_CEPH), opts.versions[0]!, opts.source, opts.queueDepth)
      : await compareWithSource(repo, pipeline, opts.versions[0]!, opts);
  const invalid = [...repo.index.allVersions()].filter((v) => !v.valid).map((v) => v.id);
  return {
    blocks_selected: selected.length,
    blocks_checked: chosen.length,
    bytes_checked: totalBytes,
    damaged,
    invalidated_versions: invalidated,
    invalid_versions: invalid,
    revalidated_versions: revalidated,
    source_differences: differences,
    blocks_due: due,
  };
}

interface SelectedBlock {
  checksum: Buffer;
  record: BlockRecord;
}

/**
 * The distinct blocks of the given versions (with none given: of every version, plus the blocks no version
 * references). A block a version references but the block table does not know is selected too, with its
 * size from the map, so that a missing object is found either way.
 */
function selectBlocks(repo: Repository, named: VersionRecord[]): SelectedBlock[] {
  const all = named.length === 0;
  const versions = all ? [...repo.index.allVersions()] : named;
  const seen = new Map<string, SelectedBlock>();
  for (const v of versions) {
    const blocks = v.complete ? Math.ceil(v.size / v.block_size) : v.blocks_done;
    const cursor = repo.index.mapCursor(v.id, blocks);
    for (let i = 0; i < blocks; i++) {
      const c = cursor.get(i);
      if (!c) continue;
      const hex = c.toString('hex');
      if (seen.has(hex)) continue;
      const record = repo.index.getBlock(c) ?? {
        size: Math.min(v.block_size, v.size - i * v.block_size),
        stored: 0,
        key_id: 0,
        valid: false,
        verified: 0,
      };
      seen.set(hex, { checksum: c, record });
    }
  }
  // --all: also blocks no version references (they are read too: they may be needed again by dedup).
  if (all) for (const { checksum, record } of repo.index.allBlocks()) if (!seen.has(checksum.toString('hex'))) seen.set(checksum.toString('hex'), { checksum, record });
  return [...seen.values()];
}

/** Deep scrub: reads the live source and compares every block (sparse ones included) with the version's map. */
async function compareWithSource(repo: Repository, pipeline: BlockPipeline, v: VersionRecord, opts: ScrubOptions): Promise<SourceDifference[]> {
  const path = sourcePath(opts.source!);
  const info = await inspectSource(path);
  const bs = v.block_size;
  const blocks = Math.ceil(Math.max(info.size, v.size) / bs);
  const reader = await SourceReader.open(path, { blockSize: bs, slots: opts.queueDepth, direct: opts.direct });
  const cursor = repo.index.mapCursor(v.id, Math.ceil(v.size / bs));
  const diffs: SourceDifference[] = [];
  try {
    await orderedWindow<boolean>(
      blocks,
      opts.queueDepth,
      async (i) => {
        const inVersion = i * bs < v.size;
        const inSource = i * bs < info.size;
        const expected = inVersion ? cursor.get(i) : null;
        if (!inVersion || !inSource) return false;
        const length = Math.min(bs, info.size - i * bs);
        if (length !== Math.min(bs, v.size - i * bs)) return false;
        const { checksum } = await pipeline.digest(await reader.read(i * bs, length));
        return checksum === null ? expected === null : expected !== null && checksum.equals(expected);
      },
      (i, same) => {
        if (same) return;
        const offset = i * bs;
        diffs.push({ block: i, offset, length: Math.min(bs, Math.max(info.size, v.size) - offset) });
      },
    );
  } finally {
    await reader.close();
  }
  return diffs;
}
