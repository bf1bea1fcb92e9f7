import { ObjectNames } from '../store/blobstore.js';
import type { Repository } from './repository.js';

export interface VersionUsage {
  id: string;
  name: string;
  date: string;
  size: number;
  /** Stored bytes of the distinct blocks this version references. */
  referenced_bytes: number;
  /** Stored bytes of blocks no other version references: what removing it (and a cleanup) frees. */
  exclusive_bytes: number;
  /** Stored bytes of blocks shared with other versions. */
  shared_bytes: number;
}

export interface DiskUsage {
  versions: VersionUsage[];
  /** Stored bytes of all blocks in the index. */
  stored_bytes: number;
  /** Stored bytes of blocks no version references (freed by cleanup). */
  unreferenced_bytes: number;
}

/**
 * Space per version, shared and exclusive. Two passes over the block maps with one small entry per
 * distinct block (memory grows with unique data, not with the number of versions).
 */
export function diskUsage(repo: Repository): DiskUsage {
  const refs = new Map<string, { count: number; last: string; stored: number }>();
  const versions = [...repo.index.allVersions()];
  const eachBlock = (id: string, size: number, bs: number, fn: (hex: string, c: Buffer) => void) => {
    const cursor = repo.index.mapCursor(id, Math.ceil(size / bs));
    for (let i = 0; i < Math.ceil(size / bs); i++) {
      const c = cursor.get(i);
      if (c) fn(c.toString('hex'), c);
    }
  };
  const mapped = (v: (typeof versions)[number]) => (v.complete ? v.size : Math.min(v.size, v.blocks_done * v.block_size));
  for (const v of versions) {
    eachBlock(v.id, mapped(v), v.block_size, (hex, c) => {
      let e = refs.get(hex);
      if (!e) refs.set(hex, (e = { count: 0, last: '', stored: repo.index.getBlock(c)?.stored ?? 0 }));
      if (e.last !== v.id) {
        e.count++;
        e.last = v.id;
      }
    });
  }
  const usage: VersionUsage[] = versions.map((v) => {
    const u: VersionUsage = { id: v.id, name: v.name, date: v.date, size: v.size, referenced_bytes: 0, exclusive_bytes: 0, shared_bytes: 0 };
    const seen = new Set<string>();
    eachBlock(v.id, mapped(v), v.block_size, (hex) => {
      if (seen.has(hex)) return;
      seen.add(hex);
      const e = refs.get(hex)!;
      u.referenced_bytes += e.stored;
      if (e.count === 1) u.exclusive_bytes += e.stored;
      else u.shared_bytes += e.stored;
    });
    return u;
  });
  let stored = 0;
  let unreferenced = 0;
  for (const { checksum, record } of repo.index.allBlocks()) {
    stored += record.stored;
    if (!refs.has(checksum.toString('hex'))) unreferenced += record.stored;
  }
  usage.sort((a, b) => b.date.localeCompare(a.date));
  return { versions: usage, stored_bytes: stored, unreferenced_bytes: unreferenced };
}

export interface ConsistencyReport {
  objects_in_store: number;
  blocks_in_index: number;
  /** Blocks the index knows whose objects are missing from the store. */
  missing_objects: string[];
  /** Objects in the store the index does not know (garbage from interrupted runs, or an index to rebuild). */
  unknown_objects: string[];
}

/** Cheap consistency check of index against store: one listing, no object reads. */
export async function checkConsistency(repo: Repository): Promise<ConsistencyReport> {
  const inStore = new Set<string>();
  for await (const { name } of repo.store.list(ObjectNames.blockPrefix)) {
    const hex = name.slice(name.lastIndexOf('/') + 1);
    if (/^[0-9a-f]{64}$/.test(hex)) inStore.add(hex);
  }
  // Everything the index knows or references: the block table and every version's map.
  const known = new Set<string>();
  let blocks = 0;
  for (const { checksum } of repo.index.allBlocks()) {
    blocks++;
    known.add(checksum.toString('hex'));
  }
  for (const v of repo.index.allVersions()) {
    const blocks = v.complete ? Math.ceil(v.size / v.block_size) : v.blocks_done;
    const cursor = repo.index.mapCursor(v.id, blocks);
    for (let i = 0; i < blocks; i++) {
      const c = cursor.get(i);
      if (c) known.add(c.toString('hex'));
    }
  }
  const missing = [...known].filter((hex) => !inStore.has(hex));
  const unknown = [...inStore].filter((hex) => !known.has(hex));
  return { objects_in_store: inStore.size, blocks_in_index: blocks, missing_objects: missing, unknown_objects: unknown };
}
