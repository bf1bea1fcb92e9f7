/**
 * `restore VERSION rbd://POOL/IMAGE`: writes a version into an RBD image through `rbd import-diff -`.
 *
 * A new image is created with the version's size and only non-zero blocks are sent ('w' records), so it
 * stays thin. An existing image is refused without --force; with --force it is resized to the version and
 * sparse blocks are sent as zero records ('z', a discard), so nothing of the old contents survives. An image
 * with watchers (open in a VM, mapped) is refused even with --force.
 *
 * The stream goes out in segments, one `rbd import-diff` each: when rbd exits 0 the segment is in the
 * cluster, and only then is the restore checkpoint moved past it. `--resume` continues at the checkpoint; an
 * aborted `signal` stops the restore at the next checkpoint (StoppedError).
 */
import { IntegrityError, NotFoundError, RefusedError, StoppedError, UsageError } from '../errors.js';
import { CHUNK_BLOCKS } from '../index/blockmap.js';
import type { VersionRecord } from '../index/records.js';
import { formatBytes } from '../util/size.js';
import { pausePoint } from '../util/pause.js';
import { UNLIMITED } from '../util/throttle.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { LockNames, withLock } from './locks.js';
import { imageSpec, parseRbdUri, rbdLabel, type RbdClient, type RbdSpec } from './rbd.js';
import { encodeExtent, encodeHeader, END_RECORD } from './rbdDiff.js';
import type { Repository } from './repository.js';
import type { DamagedRange, RestoreOptions, RestoreResult } from './restore.js';

/** Blocks per import-diff run (and per checkpoint). */
const SEGMENT_BLOCKS = 64;

export async function restoreToRbd(repo: Repository, pipeline: BlockPipeline, client: RbdClient, version: VersionRecord, opts: RestoreOptions): Promise<RestoreResult> {
  if (!version.complete) {
    throw new RefusedError(`Version ${version.id} is incomplete (its backup was interrupted); resume or repeat the backup, or pick another version.`);
  }
  const spec = parseRbdUri(opts.target, { snapshot: 'forbidden' });
  const key = rbdLabel(spec);
  return withLock(repo.locks, LockNames.target(key), 'exclusive', `Restore target ${key}`, () =>
    withLock(repo.locks, LockNames.version(version.id), 'shared', `Version ${version.id}`, () => run(repo, pipeline, client, spec, key, version, opts)),
  );
}

async function refuseWatched(client: RbdClient, spec: RbdSpec): Promise<void> {
  const watchers = await client.watchers(spec);
  if (watchers.length > 0) {
    throw new RefusedError(
      `RBD image ${imageSpec(spec, null)} is in use (watched by ${watchers.join(', ')}: a VM or a mapping has it open); nothing was written. Stop the user first (--force does not override this).`,
    );
  }
}

async function run(repo: Repository, pipeline: BlockPipeline, client: RbdClient, spec: RbdSpec, key: string, version: VersionRecord, opts: RestoreOptions): Promise<RestoreResult> {
  const bs = version.block_size;
  const blocks = Math.ceil(version.size / bs);
  // The whole block map is authenticated before the target is touched.
  const mapCheck = repo.index.mapCursor(version.id, blocks);
  for (let i = 0; i < blocks; i += CHUNK_BLOCKS) mapCheck.get(i);

  let state = repo.index.getRestoreState(key);
  if (opts.resume) {
    if (!state) throw new NotFoundError(`There is no interrupted restore to ${key} to resume; start it without --resume.`);
    if (state.version !== version.id) throw new UsageError(`The interrupted restore to ${key} was of version ${state.version}, not ${version.id}; resume that version or restore anew with --force.`);
    const info = await client.info(spec, null);
    if (!info) throw new NotFoundError(`RBD image ${imageSpec(spec, null)} of the interrupted restore no longer exists; restore anew.`);
    await refuseWatched(client, spec);
    if (info.size !== version.size) throw new RefusedError(`RBD image ${imageSpec(spec, null)} is ${info.size} bytes, not the ${version.size} of version ${version.id}; restore anew with --force.`);
  } else {
    if (state && !opts.force) throw new RefusedError(`A restore of version ${state.version} to ${key} was interrupted; continue it with --resume, or start over with --force.`);
    const info = await client.info(spec, null);
    let zeroed: boolean;
    if (!info) {
      await client.create(spec, version.size);
      zeroed = true;
    } else {
      await refuseWatched(client, spec);
      if (!opts.force) {
        throw new RefusedError(`RBD image ${imageSpec(spec, null)} exists (${formatBytes(info.size)}); nothing was written. Use --force to overwrite it.`);
      }
      if (info.size !== version.size) await client.resize(spec, version.size);
      zeroed = false;
    }
    state = { target: key, version: version.id, blocks_done: 0, damaged: [], zeroed, sparse: opts.sparse, started: new Date().toISOString() };
    await repo.index.putRestoreState(state);
  }

  const skipSparse = state.zeroed || state.sparse;
  const damaged: DamagedRange[] = state.damaged.map((d) => ({ ...d }));
  const cursor = repo.index.mapCursor(version.id, blocks);
  const throttle = opts.writeThrottle ?? UNLIMITED;
  let bytesWritten = 0;
  for (let first = state.blocks_done; first < blocks; first += SEGMENT_BLOCKS) {
    const end = Math.min(blocks, first + SEGMENT_BLOCKS);
    const out = client.importDiff(spec);
    try {
      await out.write(encodeHeader(version.size));
      await orderedWindow<{ data: Buffer | null; error?: string }>(
        end,
        opts.queueDepth,
        async (i) => {
          const length = Math.min(bs, version.size - i * bs);
          const checksum = cursor.get(i);
          if (!checksum) return { data: null };
          try {
            return { data: await pipeline.load(checksum, length) };
          } catch (err) {
            if (err instanceof IntegrityError) return { data: null, error: err.message };
            throw err;
          }
        },
        async (i, r) => {
          const offset = i * bs;
          const length = Math.min(bs, version.size - offset);
          if (r.error) {
            const last = damaged[damaged.length - 1];
            if (last && last.offset + last.length === offset && last.reason === r.error) last.length += length;
            else damaged.push({ offset, length, reason: r.error });
          } else if (r.data) {
            await throttle.take(length);
            await out.write(encodeExtent('w', offset, length));
            await out.write(r.data);
            bytesWritten += length;
          } else if (!skipSparse) {
            await out.write(encodeExtent('z', offset, length));
          }
          opts.onProgress?.({ phase: 'restore', doneBytes: Math.min(version.size, offset + length), totalBytes: version.size, damaged: damaged.length });
        },
        first,
      );
      await out.write(END_RECORD);
      await out.end();
    } catch (err) {
      out.kill();
      throw err;
    }
    state.blocks_done = end;
    state.damaged = damaged.map((d) => ({ ...d }));
    await repo.index.putRestoreState(state);
    await pausePoint('restore.checkpoint');
    // Stop (the UI's Stop key) between segments: everything up to the checkpoint is in the cluster.
    if (opts.signal?.aborted && end < blocks) {
      throw new StoppedError(`The restore of version ${version.id} to ${key} was stopped after ${end} of ${blocks} blocks; continue it with --resume.`);
    }
  }
  await repo.index.removeRestoreState(key);
  return { version, target: opts.target, bytesWritten, damaged };
}
