import { RefusedError } from '../errors.js';
import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import { emptyStats, type BlockRecord, type VersionRecord } from '../index/records.js';
import { validateName } from './backup.js';
import { orderedWindow, type BlockPipeline } from './blockPipeline.js';
import { newVersionId } from './ids.js';
import { LockNames, withLock } from './locks.js';
import { writeManifest } from './manifest.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';

/** A modified view of a base version (e.g. the copy-on-write overlay of `blocksafe nbd --rw`). */
export interface ChangedView {
  /** True when anything in [offset, offset+length) differs from the base version (may over-report). */
  touches(offset: number, length: number): boolean;
  /** The content of [offset, offset+length): a fresh buffer the caller may consume. */
  read(offset: number, length: number): Promise<Buffer>;
}

export interface OverlayVersionOptions {
  /** Volume name of the new version. */
  name: string;
  snapshotName?: string;
  tags?: string[];
  queueDepth: number;
  onProgress?: ProgressListener;
}

const COMMIT_EVERY_BLOCKS = 64;

type Outcome =
  | { kind: 'sparse'; length: number }
  | { kind: 'referenced'; length: number; checksum: Buffer; valid: boolean }
  | { kind: 'data'; length: number; checksum: Buffer; record: BlockRecord; written: boolean };

/**
 * Stores a changed view of `base` as a new, protected version of `opts.name` that shares every unchanged
 * block with the base: blocks the view does not touch are referenced by checksum without reading them;
 * touched blocks are read from the view and go through the pipeline (checksum, dedup, compress, encrypt).
 * Same durability rules as a backup: the version is incomplete until its blocks, map and manifest are
 * durable. The caller holds the base version (shared lock); this takes the volume lock of `opts.name`.
 */
export async function createOverlayVersion(
  repo: Repository,
  pipeline: BlockPipeline,
  base: VersionRecord,
  view: ChangedView,
  opts: OverlayVersionOptions,
): Promise<VersionRecord> {
  validateName(opts.name);
  if (base.block_size !== repo.blockSize) throw new RefusedError(`Version ${base.id} has another block size than the repository; it cannot be the base of a new version.`);
  return withLock(repo.index, LockNames.volume(opts.name), 'exclusive', `Volume "${opts.name}"`, () => run(repo, pipeline, base, view, opts));
}

async function run(repo: Repository, pipeline: BlockPipeline, base: VersionRecord, view: ChangedView, opts: OverlayVersionOptions): Promise<VersionRecord> {
  let id = newVersionId();
  while (repo.index.hasVersion(id)) id = newVersionId();
  const started = Date.now();
  const version: VersionRecord = {
    format: 1,
    id,
    name: opts.name,
    snapshot_name: opts.snapshotName ?? '',
    date: new Date().toISOString(),
    size: base.size,
    block_size: base.block_size,
    complete: false,
    valid: true,
    protected: true,
    tags: [...new Set(opts.tags ?? [])],
    expire: null,
    blocks_done: 0,
    source: `nbd-overlay:${base.id}`,
    base: base.id,
    stats: emptyStats(),
  };
  await repo.index.putVersion(version);

  const bs = base.block_size;
  const blocks = Math.ceil(base.size / bs);
  const baseCursor = repo.index.mapCursor(base.id);
  const stats = version.stats;
  let chunkNo = 0;
  let chunk = BlockMapChunk.empty();
  let pending = new Map<string, [Buffer, BlockRecord]>();
  let since = 0;
  let valid = true;

  const commit = async () => {
    await repo.store.sync();
    const records = [...pending.values()];
    stats.duration_ms = Date.now() - started;
    await repo.index.commitProgress(version, records, [[chunkNo, chunk]]);
    pipeline.committed(records.map(([c]) => c));
    pending = new Map();
    since = 0;
  };

  await orderedWindow<Outcome>(
    blocks,
    opts.queueDepth,
    async (i) => {
      const offset = i * bs;
      const length = Math.min(bs, base.size - offset);
      if (!view.touches(offset, length)) {
        const checksum = baseCursor.get(i);
        if (!checksum) return { kind: 'sparse', length };
        return { kind: 'referenced', length, checksum, valid: repo.index.getBlock(checksum)?.valid ?? false };
      }
      const { data, checksum } = await pipeline.digest(await view.read(offset, length));
      if (!checksum) return { kind: 'sparse', length };
      const { record, written } = await pipeline.store(data, checksum);
      return { kind: 'data', length, checksum, record, written };
    },
    async (i, out) => {
      const slot = i % CHUNK_BLOCKS;
      if (slot === 0 && i > 0) {
        await commit();
        chunk = BlockMapChunk.empty();
        chunkNo = i / CHUNK_BLOCKS;
      }
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
          if (!out.valid) valid = false;
          chunk.set(slot, out.checksum);
          break;
        case 'data':
          stats.blocks_read++;
          stats.bytes_read += out.length;
          chunk.set(slot, out.checksum);
          if (out.written) {
            stats.blocks_written++;
            stats.bytes_written += out.record.stored;
            pending.set(out.checksum.toString('hex'), [out.checksum, out.record]);
          } else {
            stats.blocks_deduplicated++;
            stats.bytes_deduplicated += out.length;
          }
      }
      version.blocks_done = i + 1;
      if (++since >= COMMIT_EVERY_BLOCKS) await commit();
      opts.onProgress?.({ phase: 'saving overlay', doneBytes: Math.min(base.size, (i + 1) * bs), totalBytes: base.size, damaged: 0 });
    },
  );
  await commit();
  version.complete = true;
  version.valid = valid;
  stats.duration_ms = Date.now() - started;
  await writeManifest(repo, version);
  return repo.index.updateVersion(version.id, (v) => {
    v.complete = true;
    v.valid = valid;
    v.stats = stats;
    v.blocks_done = blocks;
  });
}
