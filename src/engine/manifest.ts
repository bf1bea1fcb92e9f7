import { CHECKSUM_BYTES } from '../codec/checksum.js';
import { ObjectType } from '../codec/object.js';
import { FormatError, IntegrityError } from '../errors.js';
import { chunkCount, CHUNK_BLOCKS } from '../index/blockmap.js';
import type { VersionRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import type { Repository } from './repository.js';

/**
 * A version manifest (object `manifests/<id>`): everything needed to restore the version and to rebuild
 * its index entries without the LMDB index. Plaintext layout:
 *
 *   u32 BE length of the JSON header | JSON header (the version record) | block map (32 bytes per block,
 *   all-zero = sparse)
 *
 * encoded with the object codec (zstd + AEAD, bound to its name).
 */
export const MANIFEST_FORMAT = 1;

export interface ManifestHeader {
  manifest_format: number;
  version: VersionRecord;
  blocks: number;
}

export async function writeManifest(repo: Repository, version: VersionRecord): Promise<void> {
  const blocks = Math.ceil(version.size / version.block_size);
  const header: ManifestHeader = { manifest_format: MANIFEST_FORMAT, version, blocks };
  const json = Buffer.from(JSON.stringify(header));
  const plain = Buffer.alloc(4 + json.length + blocks * CHECKSUM_BYTES);
  plain.writeUInt32BE(json.length, 0);
  json.copy(plain, 4);
  const mapStart = 4 + json.length;
  for (let c = 0; c < chunkCount(blocks); c++) {
    const chunk = repo.index.getChunk(version.id, c);
    // The writer commits every chunk, all-sparse ones too: a missing one was lost, it is not "sparse".
    if (!chunk) throw new IntegrityError(`Chunk ${c} of the block map of version ${version.id} is missing from the index; the version was not completed.`);
    const entries = Math.min(CHUNK_BLOCKS, blocks - c * CHUNK_BLOCKS);
    chunk.buf.copy(plain, mapStart + c * CHUNK_BLOCKS * CHECKSUM_BYTES, 0, entries * CHECKSUM_BYTES);
  }
  const name = ObjectNames.manifest(version.id);
  await repo.store.put(name, repo.encodeMeta(ObjectType.Manifest, plain, name));
  await repo.store.sync();
}

export interface Manifest {
  header: ManifestHeader;
  /** Block map: `blocks` entries of 32 bytes. */
  map: Buffer;
}

/** Largest manifest accepted: a 16 TiB volume of 4 MiB blocks (it is untrusted input, sized before allocation). */
const MAX_MANIFEST_BYTES = 160 * 2 ** 20;

/**
 * Reads and checks a manifest: authenticated (AEAD, bound to its name), of a format this blocksafe knows,
 * naming the version it is stored as, and with a block map of exactly the length its size needs. Returns
 * undefined when the manifest does not exist (removed meanwhile); throws IntegrityError when it is damaged.
 */
export async function tryReadManifest(repo: Repository, versionId: string): Promise<Manifest | undefined> {
  const name = ObjectNames.manifest(versionId);
  const raw = await repo.store.tryGet(name);
  if (!raw) return undefined;
  const bad = (why: string) => new IntegrityError(`Manifest ${versionId} is damaged (${why}).`);
  const plain = repo.decodeMeta(ObjectType.Manifest, raw, name, MAX_MANIFEST_BYTES);
  if (plain.length < 4) throw bad('truncated');
  const len = plain.readUInt32BE(0);
  if (len > plain.length - 4 || len > 2 ** 20) throw bad('header length');
  let header: ManifestHeader;
  try {
    header = JSON.parse(plain.subarray(4, 4 + len).toString('utf8')) as ManifestHeader;
  } catch {
    throw bad('header is not JSON');
  }
  if (typeof header?.manifest_format !== 'number') throw bad('no format');
  if (header.manifest_format > MANIFEST_FORMAT)
    throw new FormatError(`Manifest ${versionId} has format ${header.manifest_format}, newer than this blocksafe understands (${MANIFEST_FORMAT}); use a newer blocksafe.`);
  const v = header.version;
  if (!v || v.id !== versionId) throw bad(`it describes version ${String(v?.id).slice(0, 20)}`);
  if (!Number.isSafeInteger(v.size) || v.size < 0 || v.block_size !== repo.blockSize || header.blocks !== Math.ceil(v.size / v.block_size)) throw bad('size fields');
  const map = plain.subarray(4 + len);
  if (map.length !== header.blocks * CHECKSUM_BYTES) throw bad('block map length');
  return { header, map };
}

export async function readManifest(repo: Repository, versionId: string): Promise<Manifest> {
  const m = await tryReadManifest(repo, versionId);
  if (!m) throw new IntegrityError(`The manifest of version ${versionId} is missing from the store.`);
  return m;
}
