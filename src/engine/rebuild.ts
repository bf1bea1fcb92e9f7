import { existsSync, mkdtempSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { CHECKSUM_BYTES } from '../codec/checksum.js';
import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import { Index } from '../index/index.js';
import type { BlockRecord } from '../index/records.js';
import { ObjectNames, type BlobStore } from '../store/blobstore.js';
import { readAttributes } from './lifecycle.js';
import { readManifest } from './manifest.js';
import type { ProgressListener } from './progress.js';
import { Repository, unlock, type SecretSource } from './repository.js';

export interface RebuildResult {
  versions: number;
  blocks: number;
  /** Blocks named by a manifest whose object is missing from the store (their versions are marked invalid). */
  missing_blocks: number;
  /** Manifests that could not be read (damaged); their versions are lost to the index. */
  damaged_manifests: string[];
  /** Where the previous index was moved, if there was one. */
  previous_index: string | null;
}

/**
 * Recreates the LMDB index from the blob store alone: the manifests give versions and block maps, the
 * attributes objects give tags, protection, expiry and validity, and a listing of the store gives each
 * block's stored size. The new index is built beside the old one and swapped in at the end, so an
 * interrupted rebuild leaves the old index (if any) untouched. Incomplete versions have no manifest and are
 * not recovered; blocks are given verified = 0 so that the next `scrub --percent` checks them first.
 */
export async function rebuildIndex(store: BlobStore, secret: SecretSource, indexDir: (id: string) => string, onProgress?: ProgressListener): Promise<RebuildResult> {
  const keys = await unlock(store, secret);
  const dir = indexDir(keys.descriptor.id);
  const building = `${dir}.rebuild`;
  rmSync(building, { recursive: true, force: true });
  const index = Index.openAt(building, keys.descriptor.id);
  let result: RebuildResult;
  try {
    result = await fillIndex(Repository.withIndex(store, keys, index), onProgress);
  } finally {
    await index.close();
  }
  if (existsSync(dir)) {
    result.previous_index = `${dir}.old-${new Date().toISOString().replace(/[:.]/g, '-')}`;
    renameSync(dir, result.previous_index);
  }
  renameSync(building, dir);
  return result;
}

/** Fills the (empty) index of `repo` from the manifests and attributes in its store. */
export async function fillIndex(repo: Repository, onProgress?: ProgressListener): Promise<RebuildResult> {
  const { store, index } = repo;
  const result: RebuildResult = { versions: 0, blocks: 0, missing_blocks: 0, damaged_manifests: [], previous_index: null };
  {
    const names: string[] = [];
    for await (const name of store.list(ObjectNames.manifestPrefix)) names.push(name);
    for (const [n, name] of names.entries()) {
      const id = name.slice(ObjectNames.manifestPrefix.length);
      let manifest;
      try {
        manifest = await readManifest(repo, id);
      } catch {
        result.damaged_manifests.push(id);
        continue;
      }
      const version = { ...manifest.header.version, complete: true };
      version.blocks_done = manifest.header.blocks;
      const attrs = await readAttributes(repo, id).catch(() => undefined);
      if (attrs) Object.assign(version, { tags: attrs.tags, protected: attrs.protected, expire: attrs.expire, valid: attrs.valid });
      const blocks: [Buffer, BlockRecord][] = [];
      const seen = new Set<string>();
      const chunks: [number, BlockMapChunk][] = [];
      const bs = version.block_size;
      for (let c = 0; c * CHUNK_BLOCKS < manifest.header.blocks; c++) {
        const entries = Math.min(CHUNK_BLOCKS, manifest.header.blocks - c * CHUNK_BLOCKS);
        const chunk = BlockMapChunk.empty();
        manifest.map.copy(chunk.buf, 0, c * CHUNK_BLOCKS * CHECKSUM_BYTES, (c * CHUNK_BLOCKS + entries) * CHECKSUM_BYTES);
        for (let i = 0; i < entries; i++) {
          const checksum = chunk.get(i);
          if (!checksum || index.getBlock(checksum)) continue;
          const hex = checksum.toString('hex');
          if (seen.has(hex)) continue;
          seen.add(hex);
          const blockNo = c * CHUNK_BLOCKS + i;
          const stored = await store.size(ObjectNames.block(hex));
          if (stored === undefined) {
            result.missing_blocks++;
            version.valid = false;
          }
          blocks.push([Buffer.from(checksum), { size: Math.min(bs, version.size - blockNo * bs), stored: stored ?? 0, key_id: 0, valid: stored !== undefined, verified: 0 }]);
        }
        chunks.push([c, chunk]);
      }
      await index.commitProgress(version, blocks, chunks);
      result.versions++;
      result.blocks += blocks.length;
      onProgress?.({ phase: 'rebuild', doneBytes: n + 1, totalBytes: names.length, damaged: result.damaged_manifests.length });
    }
  }
  return result;
}

/**
 * Opens a repository whose own index cannot be written (a read-only mounted USB disk, a write-protected
 * medium): a temporary index is rebuilt from the store in $TMPDIR and removed on close. Read commands and
 * restores work; anything that writes to the store fails on the read-only filesystem with a clear error.
 */
export async function openWithTemporaryIndex(store: BlobStore, secret: SecretSource): Promise<Repository> {
  const keys = await unlock(store, secret);
  const dir = mkdtempSync(path.join(tmpdir(), `blocksafe-index-${keys.descriptor.id.slice(0, 8)}-`));
  const index = Index.openAt(dir, keys.descriptor.id);
  const repo = Repository.withIndex(store, keys, index, () => rmSync(dir, { recursive: true, force: true }));
  try {
    await fillIndex(repo);
  } catch (err) {
    await repo.close();
    throw err;
  }
  return repo;
}
