import { CHECKSUM_BYTES } from '../codec/checksum.js';
import { ObjectType } from '../codec/object.js';
import { FormatError, IntegrityError } from '../errors.js';
import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import type { BlockRecord, VersionRecord } from '../index/records.js';
import { ObjectNames, type ObjectInfo } from '../store/blobstore.js';
import { ChecksumSet } from '../util/checksumSet.js';
import { isVersionId } from './ids.js';
import { markDamaged } from './integrity.js';
import { readAttributes, writeAttributes } from './lifecycle.js';
import { tryReadManifest } from './manifest.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';

/**
 * Brings the index (a cache) in line with the store (the authority), cheaply enough to run whenever a
 * repository is opened: one listing of manifests/ and attributes/ and one small read; objects are read
 * only when something changed.
 *
 * - A manifest the index does not know (a version written by another machine sharing an S3 bucket, an
 *   index restored from an old copy, a new index) is read, checked and imported.
 * - A complete version whose manifest is gone from the store was removed elsewhere (or deleted by
 *   someone): it leaves the index, and unless `rm` itself was removing it, this is reported.
 * - A version this machine's trust record saw whose manifest is gone (deleted while no index knew it, e.g.
 *   before an index rebuild) is reported too.
 * - Attributes that changed in the store are read again; an older generation than the index knows (an
 *   old object put back to undo a `protect`) is reported and overwritten with the index's. When only the
 *   trust record knows that a newer generation existed, the newer state is lost: the version is
 *   protected (fail safe: what a rollback can undo is a `protect`), and this is reported.
 * - When a cleanup of another index deleted objects since this index last looked (`gc/generation`), block
 *   records whose objects are gone are dropped, so that no backup deduplicates against a deleted block,
 *   and interrupted versions are cut back to the part whose blocks are all still there.
 */
export interface SyncReport {
  imported: string[];
  /** Complete versions whose manifests vanished from the store (not removed by rm here). */
  vanished: { id: string; name: string; date: string }[];
  damaged_manifests: { id: string; reason: string }[];
  /** Objects in manifests/ whose names cannot be version ids (ignored). */
  foreign_names: string[];
  /** Versions whose attributes in the store went back to an older generation. */
  rolled_back: string[];
  /** Of those, the ones whose newer state was unknown (only the trust record knew a newer generation): now protected. */
  protected_after_rollback: string[];
  /** Versions this machine saw (trust record) that have no manifest in the store and were not in the index. */
  missing_manifests: string[];
  /** Blocks named by imported manifests that are missing from the store (their versions are invalid). */
  missing_blocks: number;
  /** Block records dropped because another index's cleanup deleted their objects. */
  dropped_block_records: number;
}

export interface GcGeneration {
  gc_format: 1;
  generation: number;
}

export async function readGcGeneration(repo: Repository): Promise<number> {
  const raw = await repo.store.tryGet(ObjectNames.gcGeneration);
  if (!raw) return 0;
  const g = JSON.parse(repo.decodeMeta(ObjectType.GcState, raw, ObjectNames.gcGeneration, 4096).toString('utf8')) as GcGeneration;
  if (!Number.isSafeInteger(g?.generation) || g.generation < 0) throw new IntegrityError(`${ObjectNames.gcGeneration} is damaged.`);
  return g.generation;
}

export async function writeGcGeneration(repo: Repository, generation: number): Promise<void> {
  const body: GcGeneration = { gc_format: 1, generation };
  await repo.store.put(ObjectNames.gcGeneration, repo.encodeMeta(ObjectType.GcState, Buffer.from(JSON.stringify(body)), ObjectNames.gcGeneration));
  await repo.store.sync();
}

export async function syncIndex(repo: Repository, onProgress?: ProgressListener): Promise<SyncReport> {
  const report: SyncReport = {
    imported: [],
    vanished: [],
    damaged_manifests: [],
    foreign_names: [],
    rolled_back: [],
    protected_after_rollback: [],
    missing_manifests: [],
    missing_blocks: 0,
    dropped_block_records: 0,
  };
  const { index, store } = repo;
  const fresh = index.getMeta<number>('gc_generation') === undefined && isEmpty(repo);

  const manifests = new Map<string, ObjectInfo>();
  for await (const e of store.list(ObjectNames.manifestPrefix, { namesOnly: true })) {
    const id = e.name.slice(ObjectNames.manifestPrefix.length);
    if (isVersionId(id)) manifests.set(id, e);
    else report.foreign_names.push(e.name);
  }

  // Versions the store no longer has.
  const known = new Map<string, VersionRecord>();
  for (const v of index.allVersions()) known.set(v.id, v);
  const gone: [string, null][] = [];
  const writing = new Set(repo.locks.liveLocks((r) => r.startsWith('version:')).map((l) => l.resource.slice('version:'.length)));
  for (const v of known.values()) {
    // An incomplete version has no manifest; one that `rm` marked and then died on (nobody holds it) is
    // finished here, else it would linger as "incomplete" and block every resume of its name (found by the
    // torture harness, seed 1052).
    const rmInterrupted = !v.complete && v.removing === true && !writing.has(v.id);
    if (!rmInterrupted && (!v.complete || manifests.has(v.id))) continue;
    await index.removeVersion(v.id);
    known.delete(v.id);
    gone.push([v.id, null]);
    if (!v.removing) report.vanished.push({ id: v.id, name: v.name, date: v.date });
  }
  // Versions only this machine's trust record remembers (the index was rebuilt or replaced meanwhile).
  for (const id of repo.trust.knownVersions(repo.id)) {
    if (manifests.has(id) || known.has(id) || gone.some(([g]) => g === id)) continue;
    report.missing_manifests.push(id);
    gone.push([id, null]);
  }
  // Reported once: a version removed elsewhere is not news the next time.
  if (repo.writable) repo.trust.noteAttributes(repo.id, gone);

  // Manifests the index does not know (or knows only as interrupted while nobody is writing it).
  const toImport = [...manifests.keys()].filter((id) => {
    const v = known.get(id);
    return !v || (!v.complete && !writing.has(id));
  });
  let imported = 0;
  for (const id of toImport) {
    try {
      if (await importManifest(repo, id, report)) report.imported.push(id);
    } catch (err) {
      if (!(err instanceof IntegrityError) || err instanceof FormatError) throw err;
      report.damaged_manifests.push({ id, reason: err.message });
    }
    onProgress?.({ phase: 'rebuild', doneBytes: ++imported, totalBytes: toImport.length, damaged: report.damaged_manifests.length });
  }

  await syncAttributes(repo, report);

  if (report.imported.length > 0) report.missing_blocks = await fillStoredSizes(repo);

  const storeGeneration = await readGcGeneration(repo);
  const seen = index.getMeta<number>('gc_generation');
  if (seen !== storeGeneration) {
    if (!fresh && repo.writable) report.dropped_block_records = await dropDeletedBlocks(repo);
    if (repo.writable || fresh) await index.putMeta('gc_generation', storeGeneration);
  }
  return report;
}

function isEmpty(repo: Repository): boolean {
  for (const _ of repo.index.allVersions()) return false;
  for (const _ of repo.index.allBlocks()) return false;
  return true;
}

/**
 * Imports one manifest with its attributes. Block records for checksums the index does not know get
 * `stored: 0` (unknown size), filled in from a listing by fillStoredSizes.
 */
async function importManifest(repo: Repository, id: string, report: SyncReport): Promise<boolean> {
  const manifest = await tryReadManifest(repo, id);
  if (!manifest) return false; // removed meanwhile
  const { header, map } = manifest;
  const version: VersionRecord = { ...header.version, complete: true, blocks_done: header.blocks, removing: undefined };
  delete version.removing;
  const attrs = await readAttributes(repo, id).catch((err: unknown) => {
    if (err instanceof IntegrityError && !(err instanceof FormatError)) return undefined; // keep the manifest's copy
    throw err;
  });
  if (attrs) Object.assign(version, { tags: attrs.tags, protected: attrs.protected, expire: attrs.expire, valid: attrs.valid, attributes_generation: attrs.generation });
  const trusted = repo.trust.attributesGeneration(repo.id, id);
  const rolledBack = attrs !== undefined && attrs.generation < trusted;
  if (rolledBack) Object.assign(version, { protected: true, attributes_generation: trusted });
  else if (attrs) repo.trust.noteAttributes(repo.id, [[id, attrs.generation]]);
  const bs = version.block_size;
  const chunks: [number, BlockMapChunk][] = [];
  const blocks: [Buffer, BlockRecord][] = [];
  for (let c = 0; c * CHUNK_BLOCKS < header.blocks; c++) {
    const entries = Math.min(CHUNK_BLOCKS, header.blocks - c * CHUNK_BLOCKS);
    const chunk = BlockMapChunk.empty();
    map.copy(chunk.buf, 0, c * CHUNK_BLOCKS * CHECKSUM_BYTES, (c * CHUNK_BLOCKS + entries) * CHECKSUM_BYTES);
    for (let i = 0; i < entries; i++) {
      const checksum = chunk.get(i);
      if (!checksum || repo.index.getBlock(checksum)) continue;
      const blockNo = c * CHUNK_BLOCKS + i;
      blocks.push([Buffer.from(checksum), { size: Math.min(bs, version.size - blockNo * bs), stored: 0, key_id: 0, valid: true, verified: 0 }]);
    }
    chunks.push([c, chunk]);
  }
  await repo.index.importVersion(version, chunks, blocks);
  if (rolledBack) await protectAfterRollback(repo, id, report);
  return true;
}

/**
 * The store's attributes of `id` are older than a generation this machine saw, and nothing here knows the
 * newer state: the version stays protected (the index already says so) and the store is told the same with
 * a generation above every one seen, so that rm and prune cannot act on the rolled-back state.
 */
async function protectAfterRollback(repo: Repository, id: string, report: SyncReport): Promise<void> {
  const trusted = repo.trust.attributesGeneration(repo.id, id);
  const v = await repo.index.updateVersion(id, (x) => {
    x.protected = true;
    x.attributes_generation = Math.max(x.attributes_generation ?? 0, trusted);
  });
  if (repo.writable) await writeAttributes(repo, v);
  report.rolled_back.push(id);
  report.protected_after_rollback.push(id);
}

/** Block records of unknown size (just imported) get it from one listing; those without an object are damaged. */
async function fillStoredSizes(repo: Repository): Promise<number> {
  const updates: { checksum: Buffer; expect: BlockRecord; next: BlockRecord }[] = [];
  const unsized = new ChecksumSet();
  for (const { checksum, record } of repo.index.allBlocks()) if (record.stored === 0) unsized.add(checksum);
  unsized.seal();
  if (unsized.size === 0) return 0;
  const found = new ChecksumSet();
  for await (const e of repo.store.list(ObjectNames.blockPrefix)) {
    const checksum = blockChecksumOf(e.name);
    if (!checksum || !unsized.has(checksum)) continue;
    found.add(checksum);
    const record = repo.index.getBlock(checksum);
    if (record && record.stored === 0) updates.push({ checksum, expect: record, next: { ...record, stored: e.size } });
    if (updates.length >= 4096) await repo.index.updateBlocksIf(updates.splice(0));
  }
  await repo.index.updateBlocksIf(updates);
  found.seal();
  const missing: Buffer[] = [];
  for (const { checksum, record } of repo.index.allBlocks()) if (record.stored === 0 && !found.has(checksum)) missing.push(checksum);
  await markDamaged(repo, missing);
  return missing.length;
}

/** The checksum a block object's name carries (`data/xx/<64 hex>`), or null for any other name. */
export function blockChecksumOf(name: string): Buffer | null {
  const m = /^data\/([0-9a-f]{2})\/([0-9a-f]{64})$/.exec(name);
  return m && m[2]!.startsWith(m[1]!) ? Buffer.from(m[2]!, 'hex') : null;
}

async function syncAttributes(repo: Repository, report: SyncReport): Promise<void> {
  const inStore = new Set<string>();
  for await (const e of repo.store.list(ObjectNames.attributesPrefix)) {
    const id = e.name.slice(ObjectNames.attributesPrefix.length);
    if (!isVersionId(id)) continue;
    inStore.add(id);
    const v = repo.index.getVersion(id);
    if (!v || v.attributes_mtime === e.mtime || report.rolled_back.includes(id)) continue;
    const attrs = await readAttributes(repo, id).catch((err: unknown) => {
      if (err instanceof IntegrityError && !(err instanceof FormatError)) return undefined;
      throw err;
    });
    if (!attrs) continue;
    const mine = v.attributes_generation ?? 0;
    if (attrs.generation < Math.max(mine, repo.trust.attributesGeneration(repo.id, id))) {
      // The index knows the newer state: put it back. If only this machine's trust record knows that a
      // newer one existed, the state itself is lost: fail safe.
      if (attrs.generation < mine) {
        report.rolled_back.push(id);
        if (repo.writable) await writeAttributes(repo, v);
      } else {
        await protectAfterRollback(repo, id, report);
      }
      continue;
    }
    await repo.index.updateVersion(id, (x) => {
      if (attrs.generation > mine) Object.assign(x, { tags: attrs.tags, protected: attrs.protected, expire: attrs.expire, valid: attrs.valid, attributes_generation: attrs.generation });
      x.attributes_mtime = e.mtime;
    });
  }
  // A first attributes write that never reached the store (killed or failed after the index took the new
  // generation; writeAttributes clears attributes_mtime until the store has it): write it now, or an index
  // rebuild would forget a protection (found by the torture harness, seed 30011).
  if (!repo.writable) return;
  for (const v of repo.index.allVersions()) {
    if (inStore.has(v.id) || !v.complete || v.removing || !v.attributes_generation || v.attributes_mtime !== undefined) continue;
    await writeAttributes(repo, v);
  }
}

/**
 * After another index's cleanup deleted objects: drop block records without an object, and cut interrupted
 * versions back to their longest prefix whose blocks all exist (a resume re-reads the rest).
 */
async function dropDeletedBlocks(repo: Repository): Promise<number> {
  const present = new ChecksumSet();
  for await (const e of repo.store.list(ObjectNames.blockPrefix)) {
    const c = blockChecksumOf(e.name);
    if (c) present.add(c);
  }
  present.seal();
  let gone: Buffer[] = [];
  let dropped = 0;
  for (const { checksum } of repo.index.allBlocks()) {
    if (present.has(checksum)) continue;
    gone.push(checksum);
    if (gone.length >= 4096) {
      await repo.index.removeBlocks(gone);
      dropped += gone.length;
      gone = [];
    }
  }
  await repo.index.removeBlocks(gone);
  dropped += gone.length;
  const writing = new Set(repo.locks.liveLocks((r) => r.startsWith('version:')).map((l) => l.resource.slice('version:'.length)));
  for (const v of repo.index.allVersions()) {
    if (v.complete || writing.has(v.id) || v.blocks_done === 0) continue;
    const cursor = repo.index.mapCursor(v.id, v.blocks_done);
    let keep = v.blocks_done;
    for (let i = 0; i < v.blocks_done; i++) {
      const c = cursor.get(i);
      if (c && !present.has(c)) {
        keep = i; // a resume re-reads from here
        break;
      }
    }
    if (keep < v.blocks_done) await repo.index.updateVersion(v.id, (x) => (x.blocks_done = keep));
  }
  return dropped;
}
