import { mkdirSync } from 'node:fs';
import * as path from 'node:path';
import { open, type Database, type RootDatabase } from 'lmdb';
import { FormatError, NotFoundError, UsageError } from '../errors.js';
import { BlockMapChunk, BlockMapCursor, CHUNK_BLOCKS } from './blockmap.js';
import { emptyStats, type BlockRecord, type GcCandidate, type LockRecord, type RestoreState, type VersionRecord } from './records.js';

/** Schema version of the LMDB index; bumped with a migration in MIGRATIONS when the layout changes. */
export const INDEX_SCHEMA = 2;

/**
 * The LMDB index: versions, their block maps (in chunks), and the block table keyed by checksum.
 * Everything in it can be rebuilt from the blob store (manifests), so it is a cache with transactions,
 * never the only copy of anything. Several processes may open it at once (LMDB's own locking).
 */
export class Index {
  private readonly root: RootDatabase;
  private readonly meta: Database<unknown, string>;
  private readonly versions: Database<VersionRecord, string>;
  private readonly blocks: Database<BlockRecord, Buffer>;
  private readonly maps: Database<Buffer, Buffer>;
  private readonly locks: Database<LockRecord, Buffer>;
  private readonly restores: Database<RestoreState, string>;
  private readonly gcCandidates: Database<GcCandidate, Buffer>;
  private readonly gcRefs: Database<true, Buffer>;
  private readonly translations: Database<Buffer, Buffer>;

  private constructor(dir: string, readonly repoId: string) {
    mkdirSync(dir, { recursive: true });
    this.root = open({ path: path.join(dir, 'index.mdb'), maxDbs: 16, compression: false });
    this.meta = this.root.openDB<unknown, string>('meta', {});
    this.versions = this.root.openDB<VersionRecord, string>('versions', {});
    this.blocks = this.root.openDB<BlockRecord, Buffer>('blocks', { keyEncoding: 'binary' });
    this.maps = this.root.openDB<Buffer, Buffer>('maps', { keyEncoding: 'binary', encoding: 'binary' });
    // Binary keys (resource ‖ 0x00 ‖ holder): string keys containing NUL are not ordered reliably.
    this.locks = this.root.openDB<LockRecord, Buffer>('held_locks', { keyEncoding: 'binary' });
    this.restores = this.root.openDB<RestoreState, string>('restores', {});
    this.gcCandidates = this.root.openDB<GcCandidate, Buffer>('gc_candidates', { keyEncoding: 'binary' });
    this.gcRefs = this.root.openDB<true, Buffer>('gc_refs', { keyEncoding: 'binary' });
    this.translations = this.root.openDB<Buffer, Buffer>('translations', { keyEncoding: 'binary', encoding: 'binary' });
  }

  static openAt(dir: string, repoId: string): Index {
    const index = new Index(dir, repoId);
    index.checkSchema();
    return index;
  }

  private checkSchema(): void {
    const schema = this.meta.get('schema') as number | undefined;
    const id = this.meta.get('repo_id') as string | undefined;
    if (schema === undefined) {
      this.meta.transactionSync(() => {
        this.meta.putSync('schema', INDEX_SCHEMA);
        this.meta.putSync('repo_id', this.repoId);
      });
      return;
    }
    if (schema > INDEX_SCHEMA) {
      throw new FormatError(`The index was written by a newer blocksafe (schema ${schema}, this one knows ${INDEX_SCHEMA}); upgrade blocksafe or run "blocksafe index rebuild".`);
    }
    if (id !== this.repoId) {
      throw new FormatError(`The index belongs to another repository (${id}); remove it and run "blocksafe index rebuild".`);
    }
    for (let from = schema; from < INDEX_SCHEMA; from++) {
      this.root.transactionSync(() => {
        MIGRATIONS[from]!(this.versions);
        this.meta.putSync('schema', from + 1);
      });
    }
  }

  getMeta<T>(key: string): T | undefined {
    return this.meta.get(key) as T | undefined;
  }

  async putMeta(key: string, value: unknown): Promise<void> {
    await this.meta.put(key, value);
    await this.root.flushed;
  }

  close(): Promise<void> {
    return this.root.close();
  }

  // ---- versions

  getVersion(id: string): VersionRecord | undefined {
    return this.versions.get(id);
  }

  hasVersion(id: string): boolean {
    return this.versions.doesExist(id);
  }

  /** All versions, ordered by id (callers sort by date). Streams: never loads block maps. */
  *allVersions(): Iterable<VersionRecord> {
    for (const { value } of this.versions.getRange({})) yield value;
  }

  /** The version whose id is `ref` or starts with it; throws when none or several match. */
  resolveVersion(ref: string): VersionRecord {
    if (!/^[a-z0-9]+$/.test(ref)) throw new UsageError(`"${ref}" is not a version id (ids are lowercase letters and digits).`);
    const exact = this.versions.get(ref);
    if (exact) return exact;
    const matches: VersionRecord[] = [];
    for (const { key, value } of this.versions.getRange({ start: ref })) {
      if (!key.startsWith(ref)) break;
      matches.push(value);
      if (matches.length > 5) break;
    }
    if (matches.length === 0) throw new NotFoundError(`No version "${ref}" in this repository; "blocksafe ls" lists the versions.`);
    if (matches.length > 1) {
      throw new UsageError(`Version prefix "${ref}" is ambiguous (${matches.map((m) => m.id).join(', ')}); type more characters.`);
    }
    return matches[0]!;
  }

  putVersion(v: VersionRecord): Promise<boolean> {
    return this.versions.put(v.id, v);
  }

  /** Read-modify-write of a version inside one transaction. */
  async updateVersion(id: string, change: (v: VersionRecord) => void): Promise<VersionRecord> {
    let updated: VersionRecord | undefined;
    await this.versions.transaction(() => {
      const v = this.versions.get(id);
      if (!v) throw new NotFoundError(`Version ${id} disappeared from the index (removed by another process?).`);
      change(v);
      updated = v;
      this.versions.put(id, v);
    });
    await this.root.flushed;
    return updated!;
  }

  /** Removes a version and its block map (blocks stay until cleanup). */
  async removeVersion(id: string): Promise<void> {
    await this.root.transaction(() => {
      this.versions.remove(id);
      for (const key of this.maps.getKeys(mapRange(id))) this.maps.remove(key);
    });
    await this.root.flushed;
  }

  // ---- block maps

  getChunk(versionId: string, chunk: number): BlockMapChunk | undefined {
    const buf = this.maps.get(mapKey(versionId, chunk));
    return buf ? new BlockMapChunk(Buffer.from(buf)) : undefined;
  }

  /** A cursor over a version's block map in volume order. */
  mapCursor(versionId: string): BlockMapCursor {
    return new BlockMapCursor((c) => this.getChunk(versionId, c));
  }

  // ---- blocks

  getBlock(checksum: Uint8Array): BlockRecord | undefined {
    return this.blocks.get(Buffer.from(checksum.buffer, checksum.byteOffset, checksum.byteLength));
  }

  *allBlocks(): Iterable<{ checksum: Buffer; record: BlockRecord }> {
    for (const { key, value } of this.blocks.getRange({})) yield { checksum: key, record: value };
  }

  /**
   * One durable step of a running backup: new block records, changed map chunks and the version's
   * progress, committed together and flushed to disk before returning. The caller must have made the
   * block objects durable in the store first, so the index never refers to an object that may vanish.
   */
  async commitProgress(
    version: VersionRecord,
    newBlocks: Iterable<[Buffer, BlockRecord]>,
    chunks: Iterable<[number, BlockMapChunk]>,
  ): Promise<void> {
    await this.root.transaction(() => {
      for (const [checksum, rec] of newBlocks) {
        // A block re-stored because its record was invalid heals the record.
        const current = this.blocks.get(checksum);
        if (!current || !current.valid) this.blocks.put(checksum, rec);
      }
      for (const [no, chunk] of chunks) this.maps.put(mapKey(version.id, no), chunk.buf);
      this.versions.put(version.id, version);
    });
    await this.root.flushed;
  }

  async updateBlocks(changes: Iterable<[Buffer, BlockRecord]>): Promise<void> {
    await this.root.transaction(() => {
      for (const [checksum, rec] of changes) this.blocks.put(checksum, rec);
    });
    await this.root.flushed;
  }

  // ---- locks

  /**
   * Atomically takes a lock on `resource` unless a conflicting live holder exists. `isStale` decides whether
   * a recorded holder is dead (its entry is then removed). Returns the conflicting holder, or null when the
   * lock was taken under `key`.
   */
  async acquireLock(resource: string, key: string, lock: LockRecord, isStale: (l: LockRecord) => boolean): Promise<LockRecord | null> {
    let conflict: LockRecord | null = null;
    await this.locks.transaction(() => {
      const prefix = Buffer.from(`${resource}\0`);
      const end = Buffer.from(`${resource}\u0001`);
      for (const { key: k, value } of this.locks.getRange({ start: prefix, end })) {
        if (isStale(value)) {
          this.locks.remove(k);
          continue;
        }
        if (lock.mode === 'exclusive' || value.mode === 'exclusive') {
          conflict = value;
          return;
        }
      }
      this.locks.put(Buffer.from(`${resource}\0${key}`), lock);
    });
    await this.root.flushed;
    return conflict;
  }

  async releaseLock(resource: string, key: string): Promise<void> {
    await this.locks.remove(Buffer.from(`${resource}\0${key}`));
  }

  *allLocks(): Iterable<LockRecord> {
    for (const { value } of this.locks.getRange({})) yield value;
  }

  // ---- garbage collection (see engine/cleanup.ts for the protocol)

  /** Clears the reference set of a cleanup pass (an LMDB table, so memory does not grow with the repository). */
  async clearGcRefs(): Promise<void> {
    await this.gcRefs.clearAsync();
  }

  /** Adds checksums to the reference set, in one transaction. */
  async addGcRefs(checksums: Buffer[]): Promise<void> {
    await this.gcRefs.transaction(() => {
      for (const c of checksums) this.gcRefs.put(c, true);
    });
  }

  isGcRef(checksum: Buffer): boolean {
    return this.gcRefs.doesExist(checksum);
  }

  getGcCandidate(checksum: Uint8Array): GcCandidate | undefined {
    return this.gcCandidates.get(Buffer.from(checksum.buffer, checksum.byteOffset, checksum.byteLength));
  }

  *allGcCandidates(): Iterable<{ checksum: Buffer; candidate: GcCandidate }> {
    for (const { key, value } of this.gcCandidates.getRange({})) yield { checksum: key, candidate: value };
  }

  async putGcCandidates(entries: [Buffer, GcCandidate][]): Promise<void> {
    await this.gcCandidates.transaction(() => {
      for (const [c, v] of entries) this.gcCandidates.put(c, v);
    });
  }

  async removeGcCandidates(checksums: Buffer[]): Promise<void> {
    await this.gcCandidates.transaction(() => {
      for (const c of checksums) this.gcCandidates.remove(c);
    });
  }

  /**
   * A backup is about to rely on block `checksum` (dedup) or re-write it: atomically take it off the
   * candidate list. Returns 'doomed' when a cleanup is deleting it right now (the caller waits and retries),
   * 'ok' otherwise. Synchronous and durable, but only ever needed for the rare blocks that are candidates.
   */
  rescueGcCandidate(checksum: Buffer): 'ok' | 'doomed' {
    return this.gcCandidates.transactionSync(() => {
      const c = this.gcCandidates.get(checksum);
      if (!c) return 'ok';
      if (c.doomed) return 'doomed';
      this.gcCandidates.remove(checksum);
      return 'ok';
    });
  }

  /**
   * Dooms a candidate for deletion if it is still a candidate marked at or before `cutoff` and not in the
   * reference set: its block record goes, the candidate stays with doomed = true until the object is deleted.
   */
  async doomGcCandidates(checksums: Buffer[], cutoff: number): Promise<Buffer[]> {
    const doomed: Buffer[] = [];
    await this.root.transaction(() => {
      for (const c of checksums) {
        const cand = this.gcCandidates.get(c);
        if (!cand || cand.doomed || cand.marked_at > cutoff || this.gcRefs.doesExist(c)) continue;
        this.blocks.remove(c);
        this.gcCandidates.put(c, { ...cand, doomed: true });
        doomed.push(c);
      }
    });
    await this.root.flushed;
    return doomed;
  }

  // ---- block identities of other repositories (copy): (their repository id, their checksum) -> ours

  getTranslation(foreignRepo: string, foreign: Buffer): Buffer | undefined {
    const v = this.translations.get(translationKey(foreignRepo, foreign));
    return v ? Buffer.from(v) : undefined;
  }

  async putTranslations(foreignRepo: string, pairs: [Buffer, Buffer][]): Promise<void> {
    if (pairs.length === 0) return;
    await this.translations.transaction(() => {
      for (const [foreign, ours] of pairs) this.translations.put(translationKey(foreignRepo, foreign), ours);
    });
  }

  // ---- interrupted restores, by target path

  getRestoreState(target: string): RestoreState | undefined {
    return this.restores.get(target);
  }

  async putRestoreState(state: RestoreState): Promise<void> {
    await this.restores.put(state.target, state);
    await this.root.flushed;
  }

  async removeRestoreState(target: string): Promise<void> {
    await this.restores.remove(target);
  }
}

/**
 * Index migrations, by the schema they upgrade from; each runs in one transaction with the schema bump.
 * 1 → 2: version statistics gained blocks_sampled and blocks_referenced, versions gained blocks_done.
 */
const MIGRATIONS: Record<number, (versions: Database<VersionRecord, string>) => void> = {
  1: (versions) => {
    for (const { key, value } of versions.getRange({})) {
      const v = { ...value, stats: { ...emptyStats(), ...value.stats } };
      v.blocks_done ??= v.complete ? Math.ceil(v.size / v.block_size) : 0;
      versions.put(key, v);
    }
  },
};

function translationKey(foreignRepo: string, foreign: Buffer): Buffer {
  return Buffer.concat([Buffer.from(foreignRepo, 'ascii'), Buffer.from([0]), foreign]);
}

function mapKey(versionId: string, chunk: number): Buffer {
  const key = Buffer.alloc(versionId.length + 5);
  key.write(versionId, 0, 'ascii');
  key[versionId.length] = 0;
  key.writeUInt32BE(chunk, versionId.length + 1);
  return key;
}

function mapRange(versionId: string): { start: Buffer; end: Buffer } {
  return { start: mapKey(versionId, 0), end: mapKey(versionId, 0xffffffff) };
}

export { CHUNK_BLOCKS };
