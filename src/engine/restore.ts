import { constants as fsc } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { describeSystemError, IntegrityError, NotFoundError, RefusedError, StoppedError, UsageError } from '../errors.js';
import { CHUNK_BLOCKS } from '../index/blockmap.js';
import type { VersionRecord } from '../index/records.js';
import { formatBytes } from '../util/size.js';
import { UNLIMITED, type Throttle } from '../util/throttle.js';
import { LockNames, withLock } from './locks.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { blockDeviceSize, mountsOf, readFully, writeFully } from './device.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';
import { pausePoint } from '../util/pause.js';
import { assertTargetNotInUse } from './targetInUse.js';

export interface RestoreOptions {
  target: string;
  force: boolean;
  /** Continue an interrupted restore of the same version to the same target. */
  resume?: boolean;
  writeThrottle?: Throttle;
  /** Do not write sparse (all-zero) blocks: the target is known to read as zeros (new file, thin volume). */
  sparse: boolean;
  queueDepth: number;
  onProgress?: ProgressListener;
  /** Stops the restore after the blocks in flight, with a checkpoint (StoppedError): SIGINT, the UI's Stop. */
  signal?: AbortSignal;
  /** A damaged block is taken from this version where it has an intact block at the same offset (else zeros). */
  fillFrom?: VersionRecord;
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
      if ((err as NodeJS.ErrnoException).code === 'ENOENT')
        throw new NotFoundError(`The directory ${path.dirname(path.resolve(target))} of the target does not exist; create it or choose another path.`);
      throw describeSystemError(err, `Target ${target}`);
    }
    await fh.truncate(version.size);
    return { fh, kind: 'file', zeroed: true };
  }
  if (st.isDirectory()) throw new UsageError(`Target ${target} is a directory; give a file path or a block device.`);
  await assertTargetNotInUse(target, st);
  if (st.isFile()) {
    if (st.size > 0 && !force) {
      throw new RefusedError(`Target ${target} exists and is not empty (${formatBytes(st.size)}); nothing was written. Use --force to overwrite it.`);
    }
    const fh = await fs.open(target, fsc.O_RDWR).catch((err: unknown) => {
      throw describeSystemError(err, `Target ${target}`);
    });
    // The file becomes exactly the version: old contents dropped, sparse blocks holes.
    await fh.truncate(0);
    await fh.truncate(version.size);
    return { fh, kind: 'file', zeroed: true };
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

/** The restore state is updated after this many blocks or this much time (after an fdatasync of the target). */
const CHECKPOINT_EVERY_BLOCKS = 64;
const CHECKPOINT_EVERY_MS = 5000;

/**
 * Restores a version to a file or block device. Every block is authenticated and its checksum recomputed;
 * a damaged block is reported and skipped, and the restore goes on: the restore day must not be lost to
 * one bad block. Progress is checkpointed in the index, so `resume` continues an interrupted restore of the
 * same version to the same target. The version is held (shared lock) so it cannot be removed meanwhile,
 * and the target is locked against a second restore.
 */
export async function restore(repo: Repository, pipeline: BlockPipeline, version: VersionRecord, opts: RestoreOptions): Promise<RestoreResult> {
  if (!version.complete) {
    throw new RefusedError(`Version ${version.id} is incomplete (its backup was interrupted); resume or repeat the backup, or pick another version.`);
  }
  const fill = opts.fillFrom;
  if (fill && (!fill.complete || fill.block_size !== version.block_size || fill.id === version.id)) {
    throw new UsageError(`Version ${fill.id} cannot fill damaged ranges of ${version.id}: it must be another complete version with the same block size (${formatBytes(version.block_size)}).`);
  }
  const targetKey = await canonicalTarget(opts.target);
  const run = () => withLock(repo.locks, LockNames.version(version.id), 'shared', `Version ${version.id}`, () => runRestore(repo, pipeline, version, opts, targetKey));
  return withLock(repo.locks, LockNames.target(targetKey), 'exclusive', `Restore target ${opts.target}`, () =>
    fill ? withLock(repo.locks, LockNames.version(fill.id), 'shared', `Version ${fill.id}`, run) : run(),
  );
}

async function runRestore(repo: Repository, pipeline: BlockPipeline, version: VersionRecord, opts: RestoreOptions, targetKey: string): Promise<RestoreResult> {
  // The whole block map is read (and authenticated) before the target is touched: an edited index fails
  // here (exit 3), before a single byte is written.
  const mapCheck = repo.index.mapCursor(version.id, Math.ceil(version.size / version.block_size));
  for (let i = 0; i < Math.ceil(version.size / version.block_size); i += CHUNK_BLOCKS) mapCheck.get(i);
  let state = repo.index.getRestoreState(targetKey);
  let fh: fs.FileHandle;
  let zeroed: boolean;
  if (opts.resume) {
    if (!state) throw new NotFoundError(`There is no interrupted restore to ${opts.target} to resume; start it without --resume.`);
    if (state.version !== version.id) {
      throw new UsageError(`The interrupted restore to ${opts.target} was of version ${state.version}, not ${version.id}; resume that version or restore anew with --force.`);
    }
    fh = await reopenTarget(version, opts.target);
    zeroed = state.zeroed;
  } else {
    if (state && !opts.force) {
      throw new RefusedError(`A restore of version ${state.version} to ${opts.target} was interrupted; continue it with --resume, or start over with --force.`);
    }
    ({ fh, zeroed } = await prepareTarget(version, opts.target, opts.force));
    state = { target: targetKey, version: version.id, blocks_done: 0, damaged: [], zeroed, sparse: opts.sparse, started: new Date().toISOString() };
    await repo.index.putRestoreState(state);
    await pausePoint('restore.started');
  }
  const bs = version.block_size;
  const blocks = Math.ceil(version.size / bs);
  const skipSparse = zeroed || state.sparse;
  const zero = Buffer.alloc(bs);
  // Damage found before an interruption is still damage: a resumed restore reports it too.
  const damaged: DamagedRange[] = state.damaged.map((d) => ({ ...d }));
  const cursor = repo.index.mapCursor(version.id, blocks);
  const fillBlocks = opts.fillFrom ? Math.ceil(opts.fillFrom.size / bs) : 0;
  const fillCursor = opts.fillFrom ? repo.index.mapCursor(opts.fillFrom.id, fillBlocks) : null;
  /** The other version's block at `i` when it covers `length` bytes there and is intact; null otherwise. */
  const fillBlock = async (i: number, length: number): Promise<Buffer | null> => {
    if (!fillCursor || !opts.fillFrom || i * bs + length > opts.fillFrom.size) return null;
    const c = fillCursor.get(i);
    if (!c) return Buffer.alloc(length); // a zero block there
    try {
      return await pipeline.load(c, length);
    } catch (err) {
      if (err instanceof IntegrityError) return null;
      throw err;
    }
  };
  const writeThrottle = opts.writeThrottle ?? UNLIMITED;
  let bytesWritten = 0;
  // Blocks before this one are written (in order): what a checkpoint on stop or failure may record.
  let doneInOrder = state.blocks_done;
  let sinceCheckpoint = 0;
  let lastCheckpoint = Date.now();
  const checkpoint = async (done: number) => {
    await fh.datasync();
    state.blocks_done = done;
    state.damaged = damaged.map((d) => ({ ...d }));
    await repo.index.putRestoreState(state);
    sinceCheckpoint = 0;
    lastCheckpoint = Date.now();
    await pausePoint('restore.checkpoint');
  };
  /** Writes block i; false when a stop was asked for while it waited for the write throttle. */
  const put = async (i: number, data: Buffer): Promise<boolean> => {
    await writeThrottle.take(data.length);
    if (opts.signal?.aborted) return false;
    try {
      await writeFully(fh, data, i * bs);
    } catch (err) {
      throw describeSystemError(err, `Writing target ${opts.target} at offset ${i * bs}`);
    }
    bytesWritten += data.length;
    return true;
  };
  // A resumed restore starts where its checkpoint is: say so at once rather than at the first block.
  opts.onProgress?.({ phase: 'restore', doneBytes: Math.min(version.size, state.blocks_done * bs), totalBytes: version.size, damaged: damaged.length });
  try {
    await orderedWindow<{ error?: string; stopped?: boolean }>(
      blocks,
      opts.queueDepth,
      async (i) => {
        if (opts.signal?.aborted) return { stopped: true };
        const length = Math.min(bs, version.size - i * bs);
        const checksum = cursor.get(i);
        if (!checksum) {
          if (!skipSparse && !(await put(i, zero.subarray(0, length)))) return { stopped: true };
          return {};
        }
        // The block is read into an arena slot, opened there and written to the target from there.
        const slot = await pipeline.arena.take();
        try {
          let at: number;
          try {
            at = await pipeline.loadInto(checksum, length, slot);
          } catch (err) {
            if (!(err instanceof IntegrityError)) throw err;
            const other = await fillBlock(i, length);
            if (other) {
              if (!(await put(i, other))) return { stopped: true };
              return { error: `${err.message} (filled from version ${opts.fillFrom!.id})` };
            }
            // A device (or a resumed file) still holds older data under a damaged block: zeros instead, so a
            // restored target never silently mixes two versions. A fresh or truncated file reads as zeros already.
            if (!zeroed && !(await put(i, zero.subarray(0, length)))) return { stopped: true };
            return { error: err.message };
          }
          if (!(await put(i, pipeline.arena.view(slot).subarray(at, at + length)))) return { stopped: true };
        } finally {
          pipeline.arena.give(slot);
        }
        return {};
      },
      async (i, out) => {
        if (out.stopped) throw new StoppedError(`The restore of version ${version.id} to ${opts.target} was stopped at ${stoppedAt(i, blocks)}; continue it with --resume.`);
        if (out.error) {
          const offset = i * bs;
          const length = Math.min(bs, version.size - offset);
          const last = damaged[damaged.length - 1];
          if (last && last.offset + last.length === offset && last.reason === out.error) last.length += length;
          else damaged.push({ offset, length, reason: out.error });
        }
        doneInOrder = i + 1;
        if (++sinceCheckpoint >= CHECKPOINT_EVERY_BLOCKS || Date.now() - lastCheckpoint >= CHECKPOINT_EVERY_MS) await checkpoint(i + 1);
        opts.onProgress?.({ phase: 'restore', doneBytes: Math.min(version.size, (i + 1) * bs), totalBytes: version.size, damaged: damaged.length });
      },
      state.blocks_done,
      0, // slot-based: nothing per block for the garbage collector
    );
    await fh.sync();
  } catch (err) {
    // Stopped, or failed (no space, a lost device, a lock): what was written in order stays written, so a
    // resume continues from there instead of from the last periodic checkpoint.
    if (doneInOrder > state.blocks_done) await checkpoint(doneInOrder).catch(() => undefined);
    throw err;
  } finally {
    await fh.close();
  }
  await repo.index.removeRestoreState(targetKey);
  return { version, target: opts.target, bytesWritten, damaged };
}

/** "81.3 % (13 of 16 blocks)". */
function stoppedAt(done: number, blocks: number): string {
  return `${((100 * done) / Math.max(1, blocks)).toFixed(1)} % (${done} of ${blocks} block${blocks === 1 ? '' : 's'})`;
}

/** The target's identity for locks and resume state: its real path (symlinks like /dev/disk/by-id resolved). */
async function canonicalTarget(target: string): Promise<string> {
  try {
    return await fs.realpath(target);
  } catch {
    return path.resolve(target);
  }
}

/** Opens the target of an interrupted restore again, with the same safety checks minus "not empty". */
async function reopenTarget(version: VersionRecord, target: string): Promise<fs.FileHandle> {
  let st;
  try {
    st = await fs.stat(target);
  } catch (err) {
    throw describeSystemError(err, `Target ${target}`);
  }
  await assertTargetNotInUse(target, st);
  if (st.isBlockDevice()) {
    const mounts = mountsOf(st.rdev);
    if (mounts.length > 0) throw new RefusedError(`Target ${target} is mounted on ${mounts.join(', ')}; unmount it first.`);
    if (blockDeviceSize(st.rdev) < version.size) throw new RefusedError(`Target ${target} is smaller than version ${version.id}.`);
    return fs.open(target, fsc.O_RDWR | fsc.O_EXCL);
  }
  if (!st.isFile()) throw new UsageError(`Target ${target} is neither a regular file nor a block device.`);
  return fs.open(target, fsc.O_RDWR);
}
