import { newestComplete } from '../engine/backup.js';
import type { Repository } from '../engine/repository.js';
import { listVersions } from '../engine/versions.js';
import { NotFoundError, RefusedError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { formatBytes } from '../util/size.js';
import { displayLocal } from '../util/time.js';

/**
 * Which versions `blocksafe nbd [VERSION…]` serves. A VERSION argument is a version id, a volume name (its
 * newest complete version), or a unique id prefix — tried in that order. Without arguments every complete
 * version is served. Incomplete versions are refused.
 */
export function selectVersions(repo: Repository, refs: string[]): VersionRecord[] {
  if (refs.length === 0) {
    const all = listVersions(repo, { includeIncomplete: false });
    if (all.length === 0) throw new NotFoundError('The repository has no complete version to serve; make a backup first.');
    return all;
  }
  const out: VersionRecord[] = [];
  for (const ref of refs) {
    const v = repo.index.getVersion(ref) ?? newestComplete(repo, ref) ?? repo.index.resolveVersion(ref);
    if (!v.complete) throw new RefusedError(`Version ${v.id} is incomplete (its backup was interrupted) and cannot be served; pick a complete version.`);
    if (!out.some((o) => o.id === v.id)) out.push(v);
  }
  return out;
}

export interface ExportName {
  name: string;
  version: VersionRecord;
  description: string;
  /** True for a volume name standing for its newest complete version. */
  alias: boolean;
}

/**
 * The names clients can ask for: every served version under its id, and each volume name whose newest
 * complete version is served (unless that name is also a served id, which wins).
 */
export function exportNames(repo: Repository, versions: VersionRecord[]): ExportName[] {
  const out: ExportName[] = versions.map((v) => ({
    name: v.id,
    version: v,
    description: `${v.name} ${displayLocal(new Date(v.date))} ${formatBytes(v.size)}${v.snapshot_name ? ` (${v.snapshot_name})` : ''}`,
    alias: false,
  }));
  const ids = new Set(versions.map((v) => v.id));
  const volumes = new Set<string>();
  for (const v of versions) {
    if (volumes.has(v.name) || ids.has(v.name)) continue;
    volumes.add(v.name);
    const newest = newestComplete(repo, v.name);
    const served = newest && versions.find((s) => s.id === newest.id);
    if (served) out.push({ name: v.name, version: served, description: `newest version of ${v.name}: ${served.id}`, alias: true });
  }
  return out;
}
