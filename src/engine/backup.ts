import { constants as fsc } from 'node:fs';
import * as fs from 'node:fs/promises';
import { describeSystemError, UsageError } from '../errors.js';
import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import { emptyStats, type BlockRecord, type VersionRecord } from '../index/records.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { inspectSource, readFully, sourcePath } from './device.js';
import { newVersionId } from './ids.js';
import { writeManifest } from './manifest.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';

export interface BackupOptions {
  source: string;
  name: string;
  snapshotName?: string;
  tags?: string[];
  /** Blocks in flight (bounded memory: ~3 × depth × block size). */
  queueDepth: number;
  onProgress?: ProgressListener;
}

type BlockOutcome = { checksum: null; length: number } | { checksum: Buffer; length: number; record: BlockRecord; written: boolean };

/** New block records and map chunks are committed to the index in groups: after this many blocks, … */
const COMMIT_EVERY_BLOCKS = 64;
/** … or after this many bytes were written, whichever comes first. */
const COMMIT_EVERY_BYTES = 256 * 2 ** 20;

/**
 * Backs up a file or block device as a new version. The version is recorded as incomplete first, block
 * objects are made durable before the index refers to them, progress is committed in groups, and the
 * version becomes complete only after its manifest is durably in the store.
 */
export async function backup(repo: Repository, pipeline: BlockPipeline, opts: BackupOptions): Promise<VersionRecord> {
  validateName(opts.name);
  const path = sourcePath(opts.source);
  const info = await inspectSource(path);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(path, fsc.O_RDONLY);
  } catch (err) {
    throw describeSystemError(err, `Source ${path}`);
  }
  const started = Date.now();
  const bs = repo.blockSize;
  const blocks = Math.ceil(info.size / bs);
  let id = newVersionId();
  while (repo.index.hasVersion(id)) id = newVersionId();
  const version: VersionRecord = {
    format: 1,
    id,
    name: opts.name,
    snapshot_name: opts.snapshotName ?? '',
    date: new Date(started).toISOString(),
    size: info.size,
    block_size: bs,
    complete: false,
    valid: true,
    protected: false,
    tags: [...new Set(opts.tags ?? [])],
    expire: null,
    blocks_done: 0,
    source: opts.source,
    base: null,
    stats: emptyStats(),
  };
  await repo.index.putVersion(version);

  const stats = version.stats;
  let chunk = BlockMapChunk.empty();
  let chunkNo = 0;
  let pendingBlocks = new Map<string, [Buffer, BlockRecord]>();
  let sinceCommit = 0;
  let bytesSinceCommit = 0;

  const commit = async () => {
    await repo.store.sync(); // objects durable before the index refers to them
    const records = [...pendingBlocks.values()];
    await repo.index.commitProgress(version, records, [[chunkNo, chunk]]);
    pipeline.committed(records.map(([c]) => c));
    pendingBlocks = new Map();
    sinceCommit = 0;
    bytesSinceCommit = 0;
  };

  try {
    await orderedWindow<BlockOutcome>(
      blocks,
      opts.queueDepth,
      async (i) => {
        const length = Math.min(bs, info.size - i * bs);
        const buf = Buffer.allocUnsafeSlow(length);
        let got: number;
        try {
          got = await readFully(fh, buf, length, i * bs);
        } catch (err) {
          throw describeSystemError(err, `Reading source ${path} at offset ${i * bs}`);
        }
        if (got !== length) throw new UsageError(`Source ${path} shrank while it was read (short read at offset ${i * bs + got}).`);
        const { data, checksum } = await pipeline.digest(buf);
        if (!checksum) return { checksum: null, length };
        const { record, written } = await pipeline.store(data, checksum);
        return { checksum, length, record, written };
      },
      async (i, out) => {
        const slot = i % CHUNK_BLOCKS;
        if (slot === 0 && i > 0) {
          // the previous chunk is full: commit it before starting the next
          await commit();
          chunk = BlockMapChunk.empty();
          chunkNo = i / CHUNK_BLOCKS;
        }
        if (out.checksum === null) {
          stats.blocks_sparse++;
          stats.bytes_sparse += out.length;
        } else {
          stats.blocks_read++;
          stats.bytes_read += out.length;
          chunk.set(slot, out.checksum);
          if (out.written) {
            stats.blocks_written++;
            stats.bytes_written += out.record.stored;
            bytesSinceCommit += out.record.stored;
            pendingBlocks.set(out.checksum.toString('hex'), [out.checksum, out.record]);
          } else {
            stats.blocks_deduplicated++;
            stats.bytes_deduplicated += out.length;
          }
        }
        version.blocks_done = i + 1;
        sinceCommit++;
        if (sinceCommit >= COMMIT_EVERY_BLOCKS || bytesSinceCommit >= COMMIT_EVERY_BYTES) await commit();
        opts.onProgress?.({ phase: 'backup', doneBytes: Math.min(info.size, (i + 1) * bs), totalBytes: info.size, damaged: 0 });
      },
    );
    await commit();
    // The manifest describes the finished version; only once it is durable does the index say complete.
    stats.duration_ms = Date.now() - started;
    version.complete = true;
    await writeManifest(repo, version);
    return await repo.index.updateVersion(version.id, (v) => {
      v.complete = true;
      v.stats = stats;
      v.blocks_done = blocks;
    });
  } finally {
    await fh.close();
  }
}

export function validateName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$/.test(name)) {
    throw new UsageError(`Invalid volume name "${name}": use letters, digits and . _ @ : + - (at most 128 characters, not starting with a symbol).`);
  }
}
