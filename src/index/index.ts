import { randomUUID } from 'node:crypto';
import { chmodSync, mkdirSync, readdirSync } from 'node:fs';
import * as path from 'node:path';
import { open, type Database, type RootDatabase } from 'lmdb';
import { BlocksafeError, FormatError, IntegrityError, NotFoundError, UsageError } from '../errors.js';
import { IndexAuth } from './auth.js';
import { BlockMapChunk, BlockMapCursor, CHUNK_BLOCKS } from './blockmap.js';
import { decodeBlockRecord, encodeBlockRecord, sameBlockRecord } from './blockRecord.js';
import { emptyStats, type BlockRecord, type GcCandidate, type LockRecord, type RestoreState, type VersionRecord } from './records.js';

/** Schema version of the LMDB index; bumped with a migration in MIGRATIONS when the layout changes. */
export const INDEX_SCHEMA = 3;

/** A version was removed while a writer was still writing it: the writer must stop, not re-create it. */
export class VersionRemovedError extends BlocksafeError {}

type Raw = Database<Buffer, Buffer>;
type RawS = Database<Buffer, string>;

/**
 * The LMDB index: versions, their block maps (in chunks), and the block table keyed by checksum.
 * Everything in it can be rebuilt from the blob store (manifests), so it is a cache with transactions,
 * never the only copy of anything. Several processes may open it at once (LMDB's own locking).
 *
 * Every value a decision depends on (versions, maps, blocks, restore checkpoints, cleanup candidates,
 * translations, bookkeeping in `meta`) is sealed with a MAC (auth.ts): the index of a directory repository
 * lives on the medium, which is not trusted.
 */
export class Index {
  private readonly root: RootDatabase;
  /** `schema` and `repo_id` in clear (read before anything else); the rest sealed, under `auth:` keys. */
  private readonly meta: Database<unknown, string>;
  private readonly versions: RawS;
  private readonly blocks: Raw;
  private readonly maps: Raw;
  private readonly locks: Database<LockRecord, Buffer>;
  private readonly restores: RawS;
  private readonly gcCandidates: Raw;
  private readonly gcRefs: Database<true, Buffer>;
  private readonly translations: Raw;

  private constructor(
    readonly dir: string,
    readonly repoId: string,
    private readonly auth: IndexAuth,
  ) {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.root = open({ path: path.join(dir, 'index.mdb'), maxDbs: 16, compression: false });
    restrictModes(dir);
    this.meta = this.root.openDB<unknown, string>('meta', {});
    this.versions = this.root.openDB<Buffer, string>('versions', { encoding: 'binary' });
    this.blocks = this.root.openDB<Buffer, Buffer>('blocks', { keyEncoding: 'binary', encoding: 'binary' });
    this.maps = this.root.openDB<Buffer, Buffer>('maps', { keyEncoding: 'binary', encoding: 'binary' });
    // Binary keys (resource ‖ 0x00 ‖ holder): string keys containing NUL are not ordered reliably.
    this.locks = this.root.openDB<LockRecord, Buffer>('held_locks', { keyEncoding: 'binary' });
    this.restores = this.root.openDB<Buffer, string>('restores', { encoding: 'binary' });
    this.gcCandidates = this.root.openDB<Buffer, Buffer>('gc_candidates', { keyEncoding: 'binary', encoding: 'binary' });
    this.gcRefs = this.root.openDB<true, Buffer>('gc_refs', { keyEncoding: 'binary' });
    this.translations = this.root.openDB<Buffer, Buffer>('translations', { keyEncoding: 'binary', encoding: 'binary' });
  }

  /** Opens (creating when absent) the index of repository `repoId`, authenticated with the repository's MAC key. */
  static openAt(dir: string, repoId: string, macKey: Uint8Array): Index {
    const index = new Index(dir, repoId, new IndexAuth(macKey));
    try {
      index.checkSchema();
    } catch (err) {
      void index.close();
      throw err;
    }
    return index;
  }

  private checkSchema(): void {
    const schema = this.meta.get('schema') as number | undefined;
    const id = this.meta.get('repo_id') as string | undefined;
    if (schema === undefined) {
      this.root.transactionSync(() => {
        this.meta.putSync('schema', INDEX_SCHEMA);
        this.meta.putSync('repo_id', this.repoId);
        this.putMetaSync('index_id', randomUUID());
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
        MIGRATIONS[from]!(this.rawTables(), this.auth);
        this.meta.putSync('schema', from + 1);
      });
    }
  }

  private rawTables(): MigrationTables {
    return {
      root: this.root,
      meta: this.meta,
      versions: this.versions,
      blocks: this.blocks,
      maps: this.maps,
      restores: this.restores,
      gcCandidates: this.gcCandidates,
      translations: this.translations,
    };
  }

  /** Random id of this index: processes sharing it see each other's cleanup candidates (see cleanup.ts). */
  get indexId(): string {
    return this.getMeta<string>('index_id') ?? this.repoId;
  }

  getMeta<T>(key: string): T | undefined {
    const raw = this.meta.get(`auth:${key}`) as Buffer | undefined;
    return raw === undefined ? undefined : this.auth.openJson<{ v: T }>('meta', key, raw).v;
  }

  private putMetaSync(key: string, value: unknown): void {
    this.meta.putSync(`auth:${key}`, this.auth.sealJson('meta', key, { v: value }));
  }

  async putMeta(key: string, value: unknown): Promise<void> {
    await this.meta.put(`auth:${key}`, this.auth.sealJson('meta', key, { v: value }));
    await this.root.flushed;
  }

  close(): Promise<void> {
    return this.root.close();
  }

  // ---- versions

  private decodeVersion(id: string, raw: Buffer): VersionRecord {
    const v = this.auth.openJson<VersionRecord>('versions', id, raw);
    if (v.id !== id) throw new IntegrityError(`The index entry of version ${id} names version ${v.id}; run "blocksafe index rebuild".`);
    return v;
  }

  private sealVersion(v: VersionRecord): Buffer {
    return this.auth.sealJson('versions', v.id, v);
  }

  getVersion(id: string): VersionRecord | undefined {
    const raw = this.versions.get(id);
    return raw === undefined ? undefined : this.decodeVersion(id, raw);
  }

  hasVersion(id: string): boolean {
    return this.versions.doesExist(id);
  }

  /** All versions, ordered by id (callers sort by date). Streams: never loads block maps. */
  *allVersions(): Iterable<VersionRecord> {
    for (const { key, value } of this.versions.getRange({})) yield this.decodeVersion(key, value);
  }

  /** The version whose id is `ref` or starts with it; throws when none or several match. */
  resolveVersion(ref: string): VersionRecord {
    if (!/^[a-z0-9]{1,64}$/.test(ref)) throw new UsageError(`"${ref}" is not a version id (ids are lowercase letters and digits).`);
    const exact = this.getVersion(ref);
    if (exact) return exact;
    const matches: string[] = [];
    for (const key of this.versions.getKeys({ start: ref })) {
      if (!key.startsWith(ref)) break;
      matches.push(key);
      if (matches.length > 5) break;
    }
    if (matches.length === 0) throw new NotFoundError(`No version "${ref}" in this repository; "blocksafe ls" lists the versions.`);
    if (matches.length > 1) throw new UsageError(`Version prefix "${ref}" is ambiguous (${matches.join(', ')}); type more characters.`);
    return this.getVersion(matches[0]!)!;
  }

  /** Records a new version; fails when the id is taken (ids are never reused while a version holds them). */
  async createVersion(v: VersionRecord): Promise<void> {
    const ok = await this.versions.ifNoExists(v.id, () => {
      this.versions.put(v.id, this.sealVersion(v));
    });
    await this.root.flushed;
    if (!ok) throw new BlocksafeError(`Version id ${v.id} is taken already.`);
  }

  /** Read-modify-write of a version inside one transaction. */
  async updateVersion(id: string, change: (v: VersionRecord) => void): Promise<VersionRecord> {
    let updated: VersionRecord | undefined;
    await this.versions.transaction(() => {
      const raw = this.versions.get(id);
      if (raw === undefined) throw new NotFoundError(`Version ${id} disappeared from the index (removed by another process?).`);
      const v = this.decodeVersion(id, raw);
      change(v);
      updated = v;
      this.versions.put(id, this.sealVersion(v));
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

  /**
   * Adds a complete version with its whole block map in one transaction (index sync and rebuild import a
   * manifest this way). `blocks` are records for checksums the block table does not know yet.
   */
  async importVersion(v: VersionRecord, chunks: Iterable<[number, BlockMapChunk]>, blocks: Iterable<[Buffer, BlockRecord]>): Promise<void> {
    await this.root.transaction(() => {
      for (const key of this.maps.getKeys(mapRange(v.id))) this.maps.remove(key);
      for (const [no, chunk] of chunks) this.maps.put(mapKey(v.id, no), this.auth.seal('maps', mapKey(v.id, no), chunk.buf));
      for (const [checksum, rec] of blocks) if (!this.blocks.doesExist(checksum)) this.blocks.put(checksum, this.sealBlock(checksum, rec));
      this.versions.put(v.id, this.sealVersion(v));
    });
    await this.root.flushed;
  }

  // ---- block maps

  getChunk(versionId: string, chunk: number): BlockMapChunk | undefined {
    const key = mapKey(versionId, chunk);
    const raw = this.maps.get(key);
    return raw ? new BlockMapChunk(Buffer.from(this.auth.open('maps', key, raw))) : undefined;
  }

  /**
   * A cursor over a version's block map in volume order, for blocks [0, blocks). Every chunk below that is
   * written by the writer (all-sparse ones too), so a missing one means a damaged or edited index.
   */
  mapCursor(versionId: string, blocks: number): BlockMapCursor {
    return new BlockMapCursor((c) => {
      const chunk = this.getChunk(versionId, c);
      if (!chunk && c * CHUNK_BLOCKS < blocks) {
        throw new IntegrityError(`Chunk ${c} of the block map of version ${versionId} is missing from the index; run "blocksafe index rebuild".`);
      }
      return chunk;
    });
  }

  // ---- blocks

  private sealBlock(checksum: Uint8Array, rec: BlockRecord): Buffer {
    return this.auth.seal('blocks', checksum, encodeBlockRecord(rec));
  }

  private openBlock(checksum: Uint8Array, raw: Buffer): BlockRecord {
    return decodeBlockRecord(this.auth.open('blocks', checksum, raw));
  }

  getBlock(checksum: Uint8Array): BlockRecord | undefined {
    const key = Buffer.from(checksum.buffer, checksum.byteOffset, checksum.byteLength);
    const raw = this.blocks.get(key);
    return raw === undefined ? undefined : this.openBlock(key, raw);
  }

  *allBlocks(): Iterable<{ checksum: Buffer; record: BlockRecord }> {
    for (const { key, value } of this.blocks.getRange({})) yield { checksum: key, record: this.openBlock(key, value) };
  }

  /**
   * One durable step of a running backup: new block records, changed map chunks and the version's
   * progress, committed together and flushed to disk before returning. The caller must have made the
   * block objects durable in the store first, so the index never refers to an object that may vanish.
   * The version must still be there: a writer whose version was removed stops (VersionRemovedError)
   * instead of bringing it back.
   */
  async commitProgress(version: VersionRecord, newBlocks: Iterable<[Buffer, BlockRecord]>, chunks: Iterable<[number, BlockMapChunk]>): Promise<void> {
    await this.root.transaction(() => {
      const current = this.versions.get(version.id);
      if (current === undefined || this.decodeVersion(version.id, current).removing) {
        throw new VersionRemovedError(`Version ${version.id} was removed while it was being written; it was not completed (its blocks are left to cleanup).`);
      }
      for (const [checksum, rec] of newBlocks) {
        // A block re-stored because its record was invalid heals the record.
        const raw = this.blocks.get(checksum);
        if (raw === undefined || !this.openBlock(checksum, raw).valid) this.blocks.put(checksum, this.sealBlock(checksum, rec));
      }
      for (const [no, chunk] of chunks) this.maps.put(mapKey(version.id, no), this.auth.seal('maps', mapKey(version.id, no), chunk.buf));
      this.versions.put(version.id, this.sealVersion(version));
    });
    await this.root.flushed;
  }

  /**
   * Compare-and-set of block records: each change applies only while the record still equals `expect`
   * (a cleanup may have removed it, a backup healed it, a rekey replaced its object since it was read).
   * Returns the changes that applied.
   */
  async updateBlocksIf(changes: { checksum: Buffer; expect: BlockRecord; next: BlockRecord }[]): Promise<Buffer[]> {
    const applied: Buffer[] = [];
    if (changes.length === 0) return applied;
    await this.root.transaction(() => {
      for (const { checksum, expect, next } of changes) {
        const raw = this.blocks.get(checksum);
        if (raw === undefined || !sameBlockRecord(this.openBlock(checksum, raw), expect)) continue;
        this.blocks.put(checksum, this.sealBlock(checksum, next));
        applied.push(checksum);
      }
    });
    await this.root.flushed;
    return applied;
  }

  /** Removes block records (index sync: their objects are gone from the store). */
  async removeBlocks(checksums: Buffer[]): Promise<void> {
    await this.root.transaction(() => {
      for (const c of checksums) this.blocks.remove(c);
    });
    await this.root.flushed;
  }

  // ---- locks (see engine/locks.ts): not authenticated, a forged lock can only make a command wait

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

  /** Heartbeat: sets `refreshed` on the locks this holder still has. */
  async refreshLocks(held: { resource: string; key: string }[], now: number): Promise<void> {
    await this.locks.transaction(() => {
      for (const { resource, key } of held) {
        const k = Buffer.from(`${resource}\0${key}`);
        const l = this.locks.get(k);
        if (l) this.locks.put(k, { ...l, refreshed: now });
      }
    });
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
    if (checksums.length === 0) return;
    await this.gcRefs.transaction(() => {
      for (const c of checksums) this.gcRefs.put(c, true);
    });
  }

  isGcRef(checksum: Buffer): boolean {
    return this.gcRefs.doesExist(checksum);
  }

  private openCandidate(checksum: Buffer, raw: Buffer): GcCandidate {
    return this.auth.openJson<GcCandidate>('gc_candidates', checksum, raw);
  }

  getGcCandidate(checksum: Uint8Array): GcCandidate | undefined {
    const key = Buffer.from(checksum.buffer, checksum.byteOffset, checksum.byteLength);
    const raw = this.gcCandidates.get(key);
    return raw === undefined ? undefined : this.openCandidate(key, raw);
  }

  *allGcCandidates(): Iterable<{ checksum: Buffer; candidate: GcCandidate }> {
    for (const { key, value } of this.gcCandidates.getRange({})) yield { checksum: key, candidate: this.openCandidate(key, value) };
  }

  async putGcCandidates(entries: [Buffer, GcCandidate][]): Promise<void> {
    await this.gcCandidates.transaction(() => {
      for (const [c, v] of entries) this.gcCandidates.put(c, this.auth.sealJson('gc_candidates', c, v));
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
      const raw = this.gcCandidates.get(checksum);
      if (raw === undefined) return 'ok';
      if (this.openCandidate(checksum, raw).doomed) return 'doomed';
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
        const raw = this.gcCandidates.get(c);
        if (raw === undefined) continue;
        const cand = this.openCandidate(c, raw);
        if (cand.doomed || cand.marked_at > cutoff || this.gcRefs.doesExist(c)) continue;
        this.blocks.remove(c);
        this.gcCandidates.put(c, this.auth.sealJson('gc_candidates', c, { ...cand, doomed: true }));
        doomed.push(c);
      }
    });
    await this.root.flushed;
    return doomed;
  }

  // ---- block identities of other repositories (copy): (their repository id, their checksum) -> ours

  getTranslation(foreignRepo: string, foreign: Buffer): Buffer | undefined {
    const key = translationKey(foreignRepo, foreign);
    const raw = this.translations.get(key);
    return raw ? Buffer.from(this.auth.open('translations', key, raw)) : undefined;
  }

  async putTranslations(foreignRepo: string, pairs: [Buffer, Buffer][]): Promise<void> {
    if (pairs.length === 0) return;
    await this.translations.transaction(() => {
      for (const [foreign, ours] of pairs) {
        const key = translationKey(foreignRepo, foreign);
        this.translations.put(key, this.auth.seal('translations', key, ours));
      }
    });
  }

  // ---- interrupted restores, by target path

  getRestoreState(target: string): RestoreState | undefined {
    const raw = this.restores.get(target);
    if (raw === undefined) return undefined;
    const state = this.auth.openJson<RestoreState>('restores', target, raw);
    state.damaged ??= [];
    return state;
  }

  async putRestoreState(state: RestoreState): Promise<void> {
    await this.restores.put(state.target, this.auth.sealJson('restores', state.target, state));
    await this.root.flushed;
  }

  async removeRestoreState(target: string): Promise<void> {
    await this.restores.remove(target);
    await this.root.flushed;
  }
}

/** index.mdb holds names, sources, tags and block maps: readable by its owner only. */
function restrictModes(dir: string): void {
  try {
    chmodSync(dir, 0o700);
    for (const f of readdirSync(dir)) chmodSync(path.join(dir, f), 0o600);
  } catch {
    // a read-only medium: nothing to change (and nothing new was created)
  }
}

interface MigrationTables {
  root: RootDatabase;
  meta: Database<unknown, string>;
  versions: RawS;
  blocks: Raw;
  maps: Raw;
  restores: RawS;
  gcCandidates: Raw;
  translations: Raw;
}

/**
 * Index migrations, by the schema they upgrade from; each runs in one transaction with the schema bump.
 * 1 → 2: version statistics gained blocks_sampled and blocks_referenced, versions gained blocks_done.
 * 2 → 3: every value is sealed with the index MAC (auth.ts); block records became a fixed binary layout;
 *        restore checkpoints gained their damaged ranges. The old values are trusted once, as they are
 *        (there was no key to check them against). Schemas 1 and 2 stored msgpack values (lmdb-js'
 *        default encoding), read here through msgpack handles on the same databases.
 */
const MIGRATIONS: Record<number, (t: MigrationTables, auth: IndexAuth) => void> = {
  1: (t) => {
    const versions = t.root.openDB<VersionRecord, string>('versions', {});
    for (const { key, value } of [...versions.getRange({})]) {
      const v = { ...value, stats: { ...emptyStats(), ...value.stats } };
      v.blocks_done ??= v.complete ? Math.ceil(v.size / v.block_size) : 0;
      versions.putSync(key, v);
    }
  },
  2: (t, auth) => {
    const old = <V, K extends string | Buffer>(name: string, binaryKeys: boolean) => [...t.root.openDB<V, K>(name, binaryKeys ? { keyEncoding: 'binary' } : {}).getRange({})] as { key: K; value: V }[];
    for (const { key, value } of old<VersionRecord, string>('versions', false)) t.versions.putSync(key, auth.sealJson('versions', key, value));
    for (const { key, value } of old<RestoreState, string>('restores', false)) t.restores.putSync(key, auth.sealJson('restores', key, { ...value, damaged: [] }));
    for (const { key, value } of old<GcCandidate, Buffer>('gc_candidates', true)) t.gcCandidates.putSync(key, auth.sealJson('gc_candidates', key, value));
    for (const { key, value } of old<BlockRecord, Buffer>('blocks', true)) t.blocks.putSync(key, auth.seal('blocks', key, encodeBlockRecord(value)));
    for (const { key, value } of [...t.maps.getRange({})]) t.maps.putSync(key, auth.seal('maps', key, value));
    for (const { key, value } of [...t.translations.getRange({})]) t.translations.putSync(key, auth.seal('translations', key, value));
    for (const key of ['scrub_cycle_start', 'rekey_target']) {
      const value = t.meta.get(key);
      if (value === undefined) continue;
      t.meta.removeSync(key);
      t.meta.putSync(`auth:${key}`, auth.sealJson('meta', key, { v: value }));
    }
    t.meta.putSync('auth:index_id', auth.sealJson('meta', 'index_id', { v: randomUUID() }));
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
