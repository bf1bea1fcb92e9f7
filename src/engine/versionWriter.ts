import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import { NotFoundError } from '../errors.js';
import { emptyStats, type BlockRecord, type VersionRecord, type VersionStats } from '../index/records.js';
import type { BlockPipeline } from './blockPipeline.js';
import { newVersionId } from './ids.js';
import { revalidateVersions } from './integrity.js';
import { autoTagsFor, syncValidity, writeAttributes } from './lifecycle.js';
import { LockNames, type Lock } from './locks.js';
import { writeManifest } from './manifest.js';
import type { Repository } from './repository.js';
import { now } from '../util/clock.js';
import { pausePoint } from '../util/pause.js';

/** What became of one block of a version being written. */
export type BlockOutcome =
  | { kind: 'sparse'; length: number; sampled?: boolean }
  /** Taken by reference (from a base version, or a block known under another repository's checksum) without reading. */
  | { kind: 'referenced'; length: number; checksum: Buffer }
  | { kind: 'data'; length: number; checksum: Buffer; record: BlockRecord; written: boolean; sampled?: boolean };

/**
 * New block records and map chunks are committed to the index in groups — after this many blocks or this
 * much time, whichever comes first — so an interrupted run loses at most about a second of work.
 */
const COMMIT_EVERY_BLOCKS = 64;
const COMMIT_EVERY_MS = 1000;

export interface NewVersionFields {
  name: string;
  size: number;
  source: string;
  snapshotName?: string;
  tags?: string[];
  base?: string | null;
  protected?: boolean;
  /** Keep this id (import, copy) when it is free in the repository. */
  id?: string;
  date?: string;
}

/**
 * Writes a version's block map in volume order with backup's durability rules: the version is recorded as
 * incomplete first; block objects are durable before the index refers to them; progress (new block records,
 * the current map chunk, blocks_done, stats) is committed in groups, so a resume continues at blocks_done;
 * the version becomes complete only after its manifest is durable. Backup, copy, import and the NBD overlay
 * use it.
 *
 * A writer owns its version for its whole life: it holds `version:ID` exclusively (rm, prune and a second
 * writer are refused with exit 4) and `writer` shared (cleanup and rekey see it). Every commit checks that
 * the version is still there, and before the manifest is published the writer checks that its locks are
 * still its own; it stops otherwise, so nothing it wrote is ever published over a removal.
 */
export class VersionWriter {
  private chunkNo: number;
  private chunk: BlockMapChunk;
  private pending = new Map<string, [Buffer, BlockRecord]>();
  private sinceCommit = 0;
  private lastCommit = Date.now();
  private readonly started = Date.now();
  private readonly previousDuration: number;

  private constructor(
    private readonly repo: Repository,
    private readonly pipeline: BlockPipeline,
    readonly version: VersionRecord,
    private readonly locks: Lock[],
  ) {
    this.chunkNo = Math.floor(version.blocks_done / CHUNK_BLOCKS);
    this.chunk = repo.index.getChunk(version.id, this.chunkNo) ?? BlockMapChunk.empty();
    this.previousDuration = version.stats.duration_ms;
  }

  /** Takes the locks a writer of version `id` holds for its life. */
  private static async own(repo: Repository, id: string): Promise<Lock[]> {
    const locks: Lock[] = [];
    try {
      locks.push(await repo.locks.acquire(LockNames.version(id), 'exclusive', `Version ${id}`));
      locks.push(await repo.locks.acquire(LockNames.writer, 'shared', 'Writing versions (a cleanup is deleting objects)'));
      return locks;
    } catch (err) {
      for (const l of locks) await l.release();
      throw err;
    }
  }

  /** Starts a new, incomplete version. */
  static async create(repo: Repository, pipeline: BlockPipeline, f: NewVersionFields): Promise<VersionWriter> {
    let id = f.id && !repo.index.hasVersion(f.id) ? f.id : newVersionId();
    while (repo.index.hasVersion(id)) id = newVersionId();
    const version: VersionRecord = {
      format: 1,
      id,
      name: f.name,
      snapshot_name: f.snapshotName ?? '',
      date: f.date ?? new Date(now()).toISOString(), // the test clock too: automatic tags depend on the day
      size: f.size,
      block_size: repo.blockSize,
      complete: false,
      valid: true,
      protected: f.protected ?? false,
      tags: [...new Set(f.tags ?? [])],
      expire: null,
      blocks_done: 0,
      source: f.source,
      base: f.base ?? null,
      stats: emptyStats(),
    };
    const locks = await VersionWriter.own(repo, id);
    try {
      await repo.index.createVersion(version);
    } catch (err) {
      for (const l of locks) await l.release();
      throw err;
    }
    return new VersionWriter(repo, pipeline, version, locks);
  }

  /** Continues an incomplete version at its blocks_done (refused while another writer still owns it). */
  static async resume(repo: Repository, pipeline: BlockPipeline, version: VersionRecord): Promise<VersionWriter> {
    const locks = await VersionWriter.own(repo, version.id);
    // Read again under the lock: the record a caller picked may be out of date (or gone).
    const current = repo.index.getVersion(version.id);
    if (!current || current.complete || current.removing) {
      for (const l of locks) await l.release();
      throw new NotFoundError(`The interrupted version ${version.id} is no longer there to resume (completed or removed meanwhile); start a new backup.`);
    }
    return new VersionWriter(repo, pipeline, current, locks);
  }

  /** Gives up ownership (after finish, abandon, or a failure that leaves the version resumable). */
  async release(): Promise<void> {
    for (const l of this.locks.splice(0)) await l.release();
  }

  get blocks(): number {
    return Math.ceil(this.version.size / this.version.block_size);
  }

  /** The first block still to write. */
  get first(): number {
    return this.version.blocks_done;
  }

  get stats() {
    return this.version.stats;
  }

  /** Records block `i` (called in volume order). */
  async record(i: number, out: BlockOutcome): Promise<void> {
    const slot = i % CHUNK_BLOCKS;
    if (slot === 0 && Math.floor(i / CHUNK_BLOCKS) !== this.chunkNo) {
      await this.commit(); // the previous chunk is full: commit it before starting the next
      this.chunk = BlockMapChunk.empty();
      this.chunkNo = i / CHUNK_BLOCKS;
    }
    const stats = this.version.stats;
    if (out.kind !== 'referenced' && out.sampled) stats.blocks_sampled++;
    switch (out.kind) {
      case 'sparse':
        stats.blocks_sparse++;
        stats.bytes_sparse += out.length;
        this.chunk.set(slot, null);
        break;
      case 'referenced':
        stats.blocks_referenced++;
        this.chunk.set(slot, out.checksum);
        break;
      case 'data':
        stats.blocks_read++;
        stats.bytes_read += out.length;
        this.chunk.set(slot, out.checksum);
        if (out.written) {
          stats.blocks_written++;
          stats.bytes_written += out.record.stored;
          this.pending.set(out.checksum.toString('hex'), [out.checksum, out.record]);
        } else {
          stats.blocks_deduplicated++;
          stats.bytes_deduplicated += out.length;
        }
    }
    this.version.blocks_done = i + 1;
    this.sinceCommit++;
    if (this.sinceCommit >= COMMIT_EVERY_BLOCKS || Date.now() - this.lastCommit >= COMMIT_EVERY_MS) await this.commit();
  }

  async commit(): Promise<void> {
    await this.repo.store.sync(); // objects durable before the index refers to them
    this.repo.locks.assertHealthy();
    const records = [...this.pending.values()];
    this.version.stats.duration_ms = this.previousDuration + Date.now() - this.started;
    await this.repo.index.commitProgress(this.version, records, [[this.chunkNo, this.chunk]]);
    this.pipeline.committed(records.map(([c]) => c));
    this.pending = new Map();
    this.sinceCommit = 0;
    this.lastCommit = Date.now();
    await pausePoint('writer.commit');
  }

  /**
   * Commits the rest, writes the manifest, then marks the version complete (and its attributes).
   * `stats` replaces the statistics of this run (import and copy keep those of the original backup).
   */
  async finish(opts: { autoTags?: boolean; stats?: VersionStats } = {}): Promise<VersionRecord> {
    await this.commit();
    const version = this.version;
    if (opts.autoTags) version.tags = [...new Set([...version.tags, ...autoTagsFor(this.repo, version)])];
    version.complete = true;
    version.stats = opts.stats ? { ...opts.stats } : { ...version.stats, duration_ms: this.previousDuration + Date.now() - this.started };
    // The manifest describes the finished version; only once it is durable does the index say complete.
    // Published only by a writer that still holds its locks (a lost lease means others may count us dead).
    await pausePoint('writer.finish');
    this.repo.locks.assertHealthy();
    await writeManifest(this.repo, version);
    const done = await this.repo.index.updateVersion(version.id, (v) => {
      v.complete = true;
      v.valid = version.valid;
      v.expire = version.expire;
      v.stats = version.stats;
      v.blocks_done = this.blocks;
      v.base = version.base;
      v.tags = version.tags;
    });
    await writeAttributes(this.repo, done);
    // Blocks re-stored over invalid records may have healed older versions.
    if (version.stats.blocks_written > 0) await syncValidity(this.repo, await revalidateVersions(this.repo));
    return done;
  }

  /** Drops the unfinished version (hints found wrong, …); blocks already stored are left to cleanup. */
  async abandon(): Promise<void> {
    await this.repo.index.removeVersion(this.version.id);
  }
}

/**
 * Runs `fn` with a writer for a new version (`fields`) or an interrupted one (a version record), and gives
 * up the writer's locks whatever happens; an interrupted run leaves the version incomplete and resumable.
 */
export async function withVersionWriter<T>(repo: Repository, pipeline: BlockPipeline, what: NewVersionFields | VersionRecord, fn: (writer: VersionWriter) => Promise<T>): Promise<T> {
  const writer = 'format' in what ? await VersionWriter.resume(repo, pipeline, what) : await VersionWriter.create(repo, pipeline, what);
  try {
    return await fn(writer);
  } finally {
    await writer.release();
  }
}
