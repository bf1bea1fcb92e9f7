import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import { emptyStats, type BlockRecord, type VersionRecord, type VersionStats } from '../index/records.js';
import type { BlockPipeline } from './blockPipeline.js';
import { newVersionId } from './ids.js';
import { revalidateVersions } from './integrity.js';
import { autoTagsFor, syncValidity, writeAttributes } from './lifecycle.js';
import { writeManifest } from './manifest.js';
import type { Repository } from './repository.js';

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
 * the version becomes complete only after its manifest is durable. Backup, copy and the NBD overlay use it.
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
  ) {
    this.chunkNo = Math.floor(version.blocks_done / CHUNK_BLOCKS);
    this.chunk = repo.index.getChunk(version.id, this.chunkNo) ?? BlockMapChunk.empty();
    this.previousDuration = version.stats.duration_ms;
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
      date: f.date ?? new Date().toISOString(),
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
    await repo.index.putVersion(version);
    return new VersionWriter(repo, pipeline, version);
  }

  /** Continues an incomplete version at its blocks_done. */
  static async resume(repo: Repository, pipeline: BlockPipeline, version: VersionRecord): Promise<VersionWriter> {
    await repo.index.putVersion(version);
    return new VersionWriter(repo, pipeline, version);
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
    const records = [...this.pending.values()];
    this.version.stats.duration_ms = this.previousDuration + Date.now() - this.started;
    await this.repo.index.commitProgress(this.version, records, [[this.chunkNo, this.chunk]]);
    this.pipeline.committed(records.map(([c]) => c));
    this.pending = new Map();
    this.sinceCommit = 0;
    this.lastCommit = Date.now();
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
