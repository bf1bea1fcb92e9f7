import { constants as fsc } from 'node:fs';
import * as fs from 'node:fs/promises';
import { describeSystemError, IntegrityError, RefusedError, UsageError } from '../errors.js';
import { CHUNK_BLOCKS, type BlockMapChunk } from '../index/blockmap.js';
import type { VersionRecord } from '../index/records.js';
import { formatBytes } from '../util/size.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { blockDeviceSize, mountsOf, readFully, writeFully } from './device.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';

export interface RestoreOptions {
  target: string;
  force: boolean;
  /** Do not write sparse (all-zero) blocks: the target is known to read as zeros (new file, thin volume). */
  sparse: boolean;
  queueDepth: number;
  onProgress?: ProgressListener;
}

export interface DamagedRange {
  offset: number;
  length: number;
  reason: string;
}

export interface RestoreResult {
  version: VersionRecord;
  target: string;
  bytesWritten: number;
  damaged: DamagedRange[];
}

interface PreparedTarget {
  fh: fs.FileHandle;
  kind: 'file' | 'block';
  /** True when unwritten ranges already read as zeros (fresh or truncated file). */
  zeroed: boolean;
}

/** Opens the restore target, refusing anything that would destroy data without --force. */
async function prepareTarget(version: VersionRecord, target: string, force: boolean): Promise<PreparedTarget> {
  let st;
  try {
    st = await fs.stat(target);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw describeSystemError(err, `Target ${target}`);
  }
  if (!st) {
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(target, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o600);
    } catch (err) {
      throw describeSystemError(err, `Target ${target}`);
    }
    await fh.truncate(version.size);
    return { fh, kind: 'file', zeroed: true };
  }
  if (st.isDirectory()) throw new UsageError(`Target ${target} is a directory; give a file path or a block device.`);
  if (st.isFile()) {
    if (st.size > 0 && !force) {
      throw new RefusedError(`Target ${target} exists and is not empty (${formatBytes(st.size)}); nothing was written. Use --force to overwrite it.`);
    }
    const fh = await fs.open(target, fsc.O_RDWR).catch((err: unknown) => {
      throw describeSystemError(err, `Target ${target}`);
    });
    if (st.size <= version.size) {
      // Drop the old contents so sparse blocks become holes.
      await fh.truncate(0);
      await fh.truncate(version.size);
      return { fh, kind: 'file', zeroed: true };
    }
    return { fh, kind: 'file', zeroed: false };
  }
  if (st.isBlockDevice()) {
    const mounts = mountsOf(st.rdev);
    if (mounts.length > 0) throw new RefusedError(`Target ${target} is mounted on ${mounts.join(', ')}; unmount it first (blocksafe never restores to a mounted device).`);
    const size = blockDeviceSize(st.rdev);
    if (size < version.size) {
      throw new RefusedError(`Target ${target} is too small: ${formatBytes(size)} (${size} bytes) but version ${version.id} needs ${formatBytes(version.size)} (${version.size} bytes).`);
    }
    let fh: fs.FileHandle;
    try {
      // O_EXCL on a block device fails with EBUSY when it is mounted or otherwise claimed.
      fh = await fs.open(target, fsc.O_RDWR | fsc.O_EXCL);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EBUSY') throw new RefusedError(`Target ${target} is in use (mounted or held by another program); nothing was written.`);
      throw describeSystemError(err, `Target ${target}`);
    }
    if (!force && !(await looksEmpty(fh, size))) {
      await fh.close();
      throw new RefusedError(`Target ${target} is not empty (it holds data); nothing was written. Use --force to overwrite it.`);
    }
    return { fh, kind: 'block', zeroed: false };
  }
  throw new UsageError(`Target ${target} is neither a regular file nor a block device.`);
}

/** A device whose first and last MiB are zeros is treated as empty (a full scan would take hours). */
async function looksEmpty(fh: fs.FileHandle, size: number): Promise<boolean> {
  const probe = Math.min(size, 2 ** 20);
  const buf = Buffer.alloc(probe);
  for (const pos of [0, size - probe]) {
    const n = await readFully(fh, buf, probe, pos);
    if (buf.subarray(0, n).some((b) => b !== 0)) return false;
  }
  return true;
}

/**
 * Restores a version to a file or block device. Every block is authenticated and its checksum recomputed;
 * a damaged block is reported and skipped, and the restore goes on: the restore day must not be lost to
 * one bad block.
 */
export async function restore(repo: Repository, pipeline: BlockPipeline, version: VersionRecord, opts: RestoreOptions): Promise<RestoreResult> {
  if (!version.complete) {
    throw new RefusedError(`Version ${version.id} is incomplete (its backup was interrupted); resume or repeat the backup, or pick another version.`);
  }
  const { fh, zeroed } = await prepareTarget(version, opts.target, opts.force);
  const bs = version.block_size;
  const blocks = Math.ceil(version.size / bs);
  const skipSparse = zeroed || opts.sparse;
  const zero = Buffer.alloc(bs);
  const damaged: DamagedRange[] = [];
  let bytesWritten = 0;
  let chunk: BlockMapChunk | undefined;
  let chunkNo = -1;
  try {
    await orderedWindow<{ data: Buffer | null; error?: string }>(
      blocks,
      opts.queueDepth,
      async (i) => {
        const c = Math.floor(i / CHUNK_BLOCKS);
        if (c !== chunkNo) {
          chunk = repo.index.getChunk(version.id, c);
          chunkNo = c;
        }
        const length = Math.min(bs, version.size - i * bs);
        const checksum = chunk?.get(i % CHUNK_BLOCKS) ?? null;
        let data: Buffer | null;
        if (!checksum) {
          data = skipSparse ? null : zero.subarray(0, length);
        } else {
          try {
            data = await pipeline.load(Buffer.from(checksum), length);
          } catch (err) {
            if (err instanceof IntegrityError) return { data: null, error: err.message };
            throw err;
          }
        }
        if (data) {
          try {
            await writeFully(fh, data, i * bs);
          } catch (err) {
            throw describeSystemError(err, `Writing target ${opts.target} at offset ${i * bs}`);
          }
          bytesWritten += data.length;
        }
        return { data: null };
      },
      (i, out) => {
        if (out.error) {
          const offset = i * bs;
          const length = Math.min(bs, version.size - offset);
          const last = damaged[damaged.length - 1];
          if (last && last.offset + last.length === offset && last.reason === out.error) last.length += length;
          else damaged.push({ offset, length, reason: out.error });
        }
        opts.onProgress?.({ phase: 'restore', doneBytes: Math.min(version.size, (i + 1) * bs), totalBytes: version.size, damaged: damaged.length });
      },
    );
    await fh.sync();
  } finally {
    await fh.close();
  }
  return { version, target: opts.target, bytesWritten, damaged };
}
