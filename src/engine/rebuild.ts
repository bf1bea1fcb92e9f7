import { existsSync, mkdtempSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Index } from '../index/index.js';
import type { BlobStore } from '../store/blobstore.js';
import { syncIndex, type SyncReport } from './indexSync.js';
import type { ProgressListener } from './progress.js';
import { Repository, unlock, type OpenOptions, type SecretSource } from './repository.js';

export interface RebuildResult {
  versions: number;
  blocks: number;
  /** Blocks named by a manifest whose object is missing from the store (their versions are marked invalid). */
  missing_blocks: number;
  /** Manifests that could not be read (damaged); their versions are lost to the index. */
  damaged_manifests: string[];
  /** Versions whose attributes were older than ones this machine saw (an old copy put back); now protected. */
  rolled_back: string[];
  /** Versions this machine saw (its trust record) that have no manifest in the store any more. */
  missing_manifests: string[];
  /** Where the previous index was moved, if there was one. */
  previous_index: string | null;
  /**
   * Complete versions the previous index knew that the store has no manifest for (removed on another
   * machine, or their manifests deleted or unreadable): a cleanup would treat their blocks as garbage.
   */
  not_in_store: { id: string; name: string }[];
}

/**
 * Recreates the LMDB index from the blob store alone: an empty index synchronised with the store
 * (indexSync.ts) imports every manifest with its attributes, and one listing gives each block's stored
 * size. The new index is built beside the old one and swapped in at the end, so an interrupted rebuild
 * leaves the old index (if any) untouched. Incomplete versions have no manifest and are not recovered;
 * blocks are given verified = 0 so that the next `scrub --percent` checks them first.
 */
export async function rebuildIndex(store: BlobStore, secret: SecretSource, indexDir: (id: string) => string, opts: OpenOptions = {}, onProgress?: ProgressListener): Promise<RebuildResult> {
  const keys = await unlock(store, secret, opts);
  const dir = indexDir(keys.descriptor.id);
  const building = `${dir}.rebuild`;
  rmSync(building, { recursive: true, force: true });
  const index = Index.openAt(building, keys.descriptor.id, keys.keyring.macKey);
  let result: RebuildResult;
  try {
    const repo = Repository.withIndex(store, keys, index, true, opts);
    result = summarize(repo, await syncIndex(repo, onProgress));
  } finally {
    await index.close();
  }
  if (existsSync(dir)) {
    const known = new Set<string>();
    const rebuilt = Index.openAt(building, keys.descriptor.id, keys.keyring.macKey);
    try {
      for (const v of rebuilt.allVersions()) known.add(v.id);
    } finally {
      await rebuilt.close();
    }
    result.not_in_store = (await previousVersions(dir, keys.descriptor.id, keys.keyring.macKey)).filter((v) => !known.has(v.id));
    result.previous_index = `${dir}.old-${new Date().toISOString().replace(/[:.]/g, '-')}`;
    renameSync(dir, result.previous_index);
  }
  renameSync(building, dir);
  return result;
}

function summarize(repo: Repository, r: SyncReport): RebuildResult {
  let blocks = 0;
  for (const _ of repo.index.allBlocks()) blocks++;
  return {
    versions: r.imported.length,
    blocks,
    missing_blocks: r.missing_blocks,
    damaged_manifests: r.damaged_manifests.map((d) => d.id),
    rolled_back: r.rolled_back,
    missing_manifests: r.missing_manifests,
    previous_index: null,
    not_in_store: [],
  };
}

/** Complete versions of the index being replaced, best effort: it may be damaged (why it is rebuilt). */
async function previousVersions(dir: string, repoId: string, macKey: Uint8Array): Promise<{ id: string; name: string }[]> {
  const out: { id: string; name: string }[] = [];
  try {
    const old = Index.openAt(dir, repoId, macKey);
    try {
      for (const v of old.allVersions()) if (v.complete) out.push({ id: v.id, name: v.name });
    } finally {
      await old.close();
    }
  } catch {
    // unreadable: nothing to compare with
  }
  return out;
}

/**
 * Opens a repository whose own index cannot be written (a read-only mounted USB disk, a write-protected
 * medium): a temporary index is rebuilt from the store in $TMPDIR and removed on close. Read commands and
 * restores work; anything that writes to the store fails on the read-only filesystem with a clear error.
 */
export async function openWithTemporaryIndex(store: BlobStore, secret: SecretSource, opts: OpenOptions = {}): Promise<Repository> {
  const keys = await unlock(store, secret, opts);
  const dir = mkdtempSync(path.join(tmpdir(), `blocksafe-index-${keys.descriptor.id.slice(0, 8)}-`));
  const index = Index.openAt(dir, keys.descriptor.id, keys.keyring.macKey);
  const repo = Repository.withIndex(store, keys, index, false, opts, () => rmSync(dir, { recursive: true, force: true }));
  try {
    repo.syncReport = await syncIndex(repo);
  } catch (err) {
    await repo.close();
    throw err;
  }
  return repo;
}
