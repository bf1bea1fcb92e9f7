import { RefusedError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { validateName } from './backup.js';
import { orderedWindow, type BlockPipeline } from './blockPipeline.js';
import { LockNames, withLock } from './locks.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';
import { withVersionWriter, type BlockOutcome } from './versionWriter.js';

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

/**
 * Stores a changed view of `base` as a new, protected version of `opts.name` that shares every unchanged
 * block with the base: blocks the view does not touch are referenced by checksum without reading them;
 * touched blocks are read from the view and go through the pipeline (checksum, dedup, compress, encrypt).
 * Same durability rules as a backup: the version is incomplete until its blocks, map and manifest are
 * durable. The caller holds the base version (shared lock); this takes the volume lock of `opts.name`.
 */
export async function createOverlayVersion(repo: Repository, pipeline: BlockPipeline, base: VersionRecord, view: ChangedView, opts: OverlayVersionOptions): Promise<VersionRecord> {
  validateName(opts.name);
  if (base.block_size !== repo.blockSize) throw new RefusedError(`Version ${base.id} has another block size than the repository; it cannot be the base of a new version.`);
  return withLock(repo.locks, LockNames.volume(opts.name), 'exclusive', `Volume "${opts.name}"`, () => run(repo, pipeline, base, view, opts));
}

async function run(repo: Repository, pipeline: BlockPipeline, base: VersionRecord, view: ChangedView, opts: OverlayVersionOptions): Promise<VersionRecord> {
  const fields = { name: opts.name, size: base.size, source: `nbd-overlay:${base.id}`, snapshotName: opts.snapshotName, tags: opts.tags, base: base.id, protected: true };
  return withVersionWriter(repo, pipeline, fields, async (writer) => {
    const bs = base.block_size;
    const baseCursor = repo.index.mapCursor(base.id, Math.ceil(base.size / bs));
    await orderedWindow<BlockOutcome>(
      writer.blocks,
      opts.queueDepth,
      async (i) => {
        const offset = i * bs;
        const length = Math.min(bs, base.size - offset);
        if (!view.touches(offset, length)) {
          const checksum = baseCursor.get(i);
          if (!checksum) return { kind: 'sparse', length };
          await pipeline.retain(checksum);
          // A block the base lost to damage keeps the new version invalid too.
          if (!repo.index.getBlock(checksum)?.valid) writer.version.valid = false;
          return { kind: 'referenced', length, checksum };
        }
        const { data, checksum } = await pipeline.digest(await view.read(offset, length));
        if (!checksum) return { kind: 'sparse', length };
        const { record, written } = await pipeline.store(data, checksum);
        return { kind: 'data', length, checksum, record, written };
      },
      async (i, out) => {
        await writer.record(i, out);
        opts.onProgress?.({ phase: 'saving overlay', doneBytes: Math.min(base.size, (i + 1) * bs), totalBytes: base.size, damaged: 0 });
      },
    );
    return writer.finish();
  });
}
