import { CHECKSUM_BYTES } from '../codec/checksum.js';
import { ObjectType } from '../codec/object.js';
import { IntegrityError } from '../errors.js';
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
    if (!chunk) continue; // an absent chunk is entirely sparse
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

export async function readManifest(repo: Repository, versionId: string): Promise<Manifest> {
  const name = ObjectNames.manifest(versionId);
  const plain = repo.decodeMeta(ObjectType.Manifest, await repo.store.get(name), name);
  const len = plain.readUInt32BE(0);
  const header = JSON.parse(plain.subarray(4, 4 + len).toString('utf8')) as ManifestHeader;
  const map = plain.subarray(4 + len);
  if (map.length !== header.blocks * CHECKSUM_BYTES) throw new IntegrityError(`Manifest ${versionId} is inconsistent (block map length).`);
  return { header, map };
}
