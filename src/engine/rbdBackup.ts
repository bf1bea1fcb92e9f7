/**
 * `backup rbd://POOL/IMAGE[@SNAP] NAME`: reads a snapshot through `rbd export-diff` and writes a version.
 *
 * With a base (the version taken from the previous snapshot, which still exists) the stream is
 * `export-diff --from-snap PREVIOUS`: blocks it does not touch are taken from the base without reading;
 * blocks it touches in part are the base block with the changed bytes laid over it. Without one, the stream
 * is a full export-diff: only allocated extents come, everything else is zeros (sparse blocks).
 */
import { BlocksafeError, IntegrityError, NotFoundError, RefusedError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import type { Throttle } from '../util/throttle.js';
import { newestComplete, newestIncomplete, validateName } from './backup.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { newVersionId } from './ids.js';
import { LockNames, withLock } from './locks.js';
import type { ProgressListener } from './progress.js';
import { imageSpec, openRbdSource, parseRbdUri, rbdLabel, type RbdClient, type RbdSpec } from './rbd.js';
import { DiffBlocks } from './rbdBlocks.js';
import { ByteReader, RbdDiffError, RbdDiffReader } from './rbdDiff.js';
import type { Repository } from './repository.js';
import { withVersionWriter, type BlockOutcome, type VersionWriter } from './versionWriter.js';

export interface RbdBackupOptions {
  uri: string;
  name: string;
  tags?: string[];
  resume: boolean;
  offerResume?: (interrupted: VersionRecord) => boolean;
  queueDepth: number;
  autoTags?: boolean;
  readThrottle?: Throttle;
  onProgress?: ProgressListener;
  warn: (message: string) => void;
}

export async function backupRbd(repo: Repository, pipeline: BlockPipeline, client: RbdClient, opts: RbdBackupOptions): Promise<VersionRecord> {
  validateName(opts.name);
  const spec = parseRbdUri(opts.uri);
  return withLock(repo.locks, LockNames.volume(opts.name), 'exclusive', `Volume "${opts.name}"`, () => run(repo, pipeline, client, spec, opts));
}

async function run(repo: Repository, pipeline: BlockPipeline, client: RbdClient, spec: RbdSpec, opts: RbdBackupOptions): Promise<VersionRecord> {
  const interrupted = newestIncomplete(repo, opts.name);
  if (opts.resume && !interrupted) throw new NotFoundError(`There is no interrupted backup of "${opts.name}" to resume; run the backup without --resume.`);
  const resume = opts.resume ? interrupted : interrupted && opts.offerResume?.(interrupted) ? interrupted : null;
  if (resume && resume.source !== rbdLabel(spec)) throw new RefusedError(`The interrupted version ${resume.id} was read from ${resume.source}, not ${rbdLabel(spec)}; start a new backup.`);
  if (resume && resume.block_size !== repo.blockSize) throw new RefusedError(`Version ${resume.id} was made with another block size; start a new backup.`);
  const previous = newestComplete(repo, opts.name);
  let id = resume?.id ?? newVersionId();
  while (!resume && repo.index.hasVersion(id)) id = newVersionId();

  const source = await openRbdSource(client, spec, {
    // Only a version read from this image can be the base of a diff (NAME may have had another source).
    previousSnapshot: resume
      ? resume.base
        ? (repo.index.getVersion(resume.base)?.snapshot_name ?? null)
        : null
      : previous && previous.source === rbdLabel(spec)
        ? previous.snapshot_name || null
        : null,
    resumeSnapshot: resume ? resume.snapshot_name || null : null,
    versionId: id,
    ownSnapshot: (snap) => {
      const v = repo.index.getVersion(snap.slice('blocksafe-'.length));
      if (!v) return 'no version of this repository was read from it (another repository, a removed version, or a run that failed before it began)';
      if (v.name !== opts.name) return `it belongs to the backups of "${v.name}"`;
      return true;
    },
    warn: opts.warn,
  });
  let result: VersionRecord;
  try {
    if (resume && resume.size !== source.size) throw new RefusedError(`The snapshot is ${source.size} bytes but the interrupted version ${resume.id} was ${resume.size}; start a new backup.`);
    // The base: the version read from the snapshot we diff from, and only when every block of it can be taken as is.
    let base: VersionRecord | null = null;
    let why = source.fromUnavailable;
    if (resume) {
      base = resume.base ? (repo.index.getVersion(resume.base) ?? null) : null;
      if (base && !source.fromSnap) base = null;
    } else if (source.fromSnap) {
      base = bySnapshot(repo, opts.name, source.fromSnap, rbdLabel(spec));
      if (!base) why = `no complete version of "${opts.name}" was read from ${imageSpec(spec, source.fromSnap)}`;
      else if (base.size !== source.size) [base, why] = [null, `the image size changed since version ${base.id}`];
      else if (base.block_size !== repo.blockSize) [base, why] = [null, `version ${base.id} has another block size`];
      else if (!base.valid) [base, why] = [null, `version ${base.id} has damaged blocks (a full read heals them)`];
    }
    if (!base && why && !resume) opts.warn(`reading all of ${imageSpec(spec, source.snapshot)}: ${why}.`);
    const fields = { id, name: opts.name, size: source.size, source: rbdLabel(spec), snapshotName: source.snapshot, tags: opts.tags, base: base?.id ?? null };
    const write = () => withVersionWriter(repo, pipeline, resume ?? fields, (writer) => readStream(repo, pipeline, client, spec, source.snapshot, base, writer, opts));
    result = base ? await withLock(repo.locks, LockNames.version(base.id), 'shared', `Version ${base.id}`, write) : await write();
  } catch (err) {
    await source.finish(false);
    throw err;
  }
  try {
    await source.finish(true);
  } catch (err) {
    opts.warn((err as Error).message);
  }
  return result;
}

/** The newest complete version of `name` read from that snapshot of that image. */
function bySnapshot(repo: Repository, name: string, snapshot: string, label: string): VersionRecord | null {
  let best: VersionRecord | null = null;
  for (const v of repo.index.allVersions()) {
    if (v.name === name && v.complete && v.snapshot_name === snapshot && v.source === label && (!best || v.date > best.date)) best = v;
  }
  return best;
}

async function readStream(
  repo: Repository,
  pipeline: BlockPipeline,
  client: RbdClient,
  spec: RbdSpec,
  snapshot: string,
  base: VersionRecord | null,
  writer: VersionWriter,
  opts: RbdBackupOptions,
): Promise<VersionRecord> {
  const size = writer.version.size;
  const bs = repo.blockSize;
  const fromSnap = base ? base.snapshot_name : null;
  const cursor = base ? repo.index.mapCursor(base.id, Math.ceil(base.size / bs)) : null;
  const proc = client.exportDiff(spec, snapshot, fromSnap);
  try {
    const reader = new RbdDiffReader(new ByteReader(proc.chunks), size);
    const meta = await reader.meta();
    if (meta.toSnap !== null && meta.toSnap !== snapshot) throw new BlocksafeError(`rbd export-diff sent snapshot ${meta.toSnap} instead of ${snapshot}.`);
    if (meta.fromSnap !== fromSnap) throw new BlocksafeError(`rbd export-diff sent a diff from ${meta.fromSnap ?? 'nothing'} instead of ${fromSnap ?? 'nothing'}.`);
    const blocks = new DiffBlocks(reader, bs, size);
    await orderedWindow<BlockOutcome>(
      writer.blocks,
      opts.queueDepth,
      async (i) => {
        const length = Math.min(bs, size - i * bs);
        const t = await blocks.take(i);
        if (!t) {
          // Untouched: zeros after a full export-diff, the base's block after an incremental one.
          const entry = cursor ? cursor.get(i) : null;
          if (!entry) return { kind: 'sparse', length };
          await pipeline.retain(entry);
          return { kind: 'referenced', length, checksum: entry };
        }
        await opts.readThrottle?.take(length);
        if (t.zeroOnly && (t.full || !cursor)) return { kind: 'sparse', length };
        let data = t.data;
        const entry = !t.full && cursor ? cursor.get(i) : null;
        if (entry) {
          // Part of the block changed: the rest is the base's.
          try {
            data = await pipeline.load(entry, length);
          } catch (err) {
            if (err instanceof IntegrityError)
              throw new IntegrityError(`Block ${i} of the base version ${base!.id} is damaged (${err.message}); run a full backup (\`--from\` another version) after \`blocksafe scrub\`.`);
            throw err;
          }
          for (const [from, to] of t.covered) t.data.copy(data, from, from, to);
        }
        const d = await pipeline.digest(data);
        if (!d.checksum) return { kind: 'sparse', length };
        const { record, written } = await pipeline.store(d.data, d.checksum);
        return { kind: 'data', length, checksum: d.checksum, record, written };
      },
      async (i, out) => {
        await writer.record(i, out);
        opts.onProgress?.({ phase: 'backup', doneBytes: Math.min(size, (i + 1) * bs), totalBytes: size, damaged: 0 });
      },
      writer.first,
    );
    await blocks.finish();
    await proc.done;
  } catch (err) {
    await proc.abandon(err instanceof RbdDiffError);
    throw err;
  }
  return writer.finish({ autoTags: opts.autoTags });
}
