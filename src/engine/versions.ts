import type { VersionRecord } from '../index/records.js';
import type { Repository } from './repository.js';

export interface VersionFilter {
  name?: string;
  tag?: string;
  snapshotName?: string;
  /** Only valid (true) or only invalid (false) versions. */
  valid?: boolean;
  /** Only versions whose expiry date has passed. */
  expired?: boolean;
  includeIncomplete?: boolean;
}

/** Versions matching the filter, newest first. */
export function listVersions(repo: Repository, f: VersionFilter = {}, now = Date.now()): VersionRecord[] {
  const out: VersionRecord[] = [];
  for (const v of repo.index.allVersions()) {
    if (f.name !== undefined && v.name !== f.name) continue;
    if (f.tag !== undefined && !v.tags.includes(f.tag)) continue;
    if (f.snapshotName !== undefined && v.snapshot_name !== f.snapshotName) continue;
    if (f.valid !== undefined && v.valid !== f.valid) continue;
    if (f.expired !== undefined && (v.expire !== null && Date.parse(v.expire) <= now) !== f.expired) continue;
    if (f.includeIncomplete === false && !v.complete) continue;
    out.push(v);
  }
  // Plain code-unit order (ISO dates and ids are ASCII): localeCompare goes through ICU, ~0.1 s for 1,000 versions.
  return out.sort((a, b) => (a.date === b.date ? cmp(a.id, b.id) : cmp(b.date, a.date)));
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

export interface RepositoryStats {
  versions: number;
  versions_incomplete: number;
  versions_invalid: number;
  blocks: number;
  blocks_invalid: number;
  /** Sum of plaintext sizes of stored blocks (unique data). */
  unique_bytes: number;
  /** Sum of object sizes in the store. */
  stored_bytes: number;
  /** Sum of the sizes of all versions (what a full copy of each would take). */
  logical_bytes: number;
}

export function repositoryStats(repo: Repository): RepositoryStats {
  const s: RepositoryStats = { versions: 0, versions_incomplete: 0, versions_invalid: 0, blocks: 0, blocks_invalid: 0, unique_bytes: 0, stored_bytes: 0, logical_bytes: 0 };
  for (const v of repo.index.allVersions()) {
    s.versions++;
    if (!v.complete) s.versions_incomplete++;
    if (!v.valid) s.versions_invalid++;
    s.logical_bytes += v.size;
  }
  for (const { record } of repo.index.allBlocks()) {
    s.blocks++;
    if (!record.valid) s.blocks_invalid++;
    s.unique_bytes += record.size;
    s.stored_bytes += record.stored;
  }
  return s;
}
