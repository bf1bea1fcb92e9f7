import type { BlockRecord } from '../index/records.js';
import type { Repository } from './repository.js';

/**
 * Validity bookkeeping shared by scrub and backup: a damaged block makes every version that uses it
 * invalid; a block that verifies (or is re-stored) again is valid again, and a version whose blocks are all
 * valid is valid again.
 */

/**
 * Marks these blocks invalid and every version using one of them invalid. Returns the ids of those versions.
 * `seen` gives the record each block had when it was found damaged: a record that changed since (a backup
 * re-stored the block, a rekey or cleanup replaced or removed it) is left alone (compare-and-set).
 */
export async function markDamaged(repo: Repository, damaged: Buffer[], seen?: Map<string, BlockRecord>): Promise<string[]> {
  if (damaged.length === 0) return [];
  const changes: { checksum: Buffer; expect: BlockRecord; next: BlockRecord }[] = [];
  const bad = new Set<string>();
  for (const c of damaged) {
    const hex = c.toString('hex');
    const rec = seen?.get(hex) ?? repo.index.getBlock(c);
    if (!rec) {
      bad.add(hex); // referenced but unknown to the block table: its versions are damaged all the same
      continue;
    }
    if (rec.valid) changes.push({ checksum: c, expect: rec, next: { ...rec, valid: false } });
    else bad.add(hex);
  }
  for (const c of await repo.index.updateBlocksIf(changes)) bad.add(c.toString('hex'));
  const hit: string[] = [];
  for (const v of repo.index.allVersions()) {
    if (versionUses(repo, v.id, v.complete ? v.size : v.blocks_done * v.block_size, v.block_size, (hex) => bad.has(hex))) hit.push(v.id);
  }
  for (const id of hit) await repo.index.updateVersion(id, (v) => (v.valid = false));
  return hit;
}

/** Re-validates invalid versions whose blocks are all valid now. Returns the ids made valid. */
export async function revalidateVersions(repo: Repository): Promise<string[]> {
  const healed: string[] = [];
  for (const v of repo.index.allVersions()) {
    if (v.valid || !v.complete) continue;
    const broken = versionUses(repo, v.id, v.size, v.block_size, (_hex, c) => !repo.index.getBlock(c)?.valid);
    if (!broken) healed.push(v.id);
  }
  for (const id of healed) await repo.index.updateVersion(id, (v) => (v.valid = true));
  return healed;
}

/** True when some block of the version satisfies `pred` (streams the block map chunk by chunk). */
function versionUses(repo: Repository, id: string, size: number, blockSize: number, pred: (hex: string, checksum: Buffer) => boolean): boolean {
  const blocks = Math.min(Math.ceil(size / blockSize), Number.MAX_SAFE_INTEGER);
  const cursor = repo.index.mapCursor(id, blocks);
  for (let i = 0; i < blocks; i++) {
    const c = cursor.get(i);
    if (c && pred(c.toString('hex'), c)) return true;
  }
  return false;
}
