import { RefusedError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import { LockNames, type Lock } from './locks.js';
import type { Repository } from './repository.js';
import { pausePoint } from '../util/pause.js';

/**
 * Removes versions, all or none: every one is locked exclusively (a backup writing it, a restore, scrub,
 * NBD export or mount holding it, here or on another machine, makes the removal fail with exit code 4) and
 * checked again under its lock before any is touched. For each, the index first records that it is being
 * removed, then its manifest and attributes go from the store (so an index rebuild does not bring it
 * back), then its index entries. Its blocks stay until a cleanup finds them unreferenced.
 */
export async function removeVersions(repo: Repository, versions: VersionRecord[]): Promise<void> {
  for (const v of versions) assertRemovable(v);
  const locks: Lock[] = [];
  try {
    for (const v of versions) locks.push(await repo.locks.acquire(LockNames.version(v.id), 'exclusive', `Version ${v.id}`));
    // Protected (or gone) meanwhile? Decide on the state under the locks.
    for (const v of versions) {
      const now = repo.index.getVersion(v.id);
      if (now) assertRemovable(now);
    }
    for (const v of versions) {
      if (!repo.index.getVersion(v.id)) continue;
      await repo.index.updateVersion(v.id, (x) => (x.removing = true));
      await pausePoint('rm.removing');
      await repo.store.delete([ObjectNames.manifest(v.id), ObjectNames.attributes(v.id)]);
      await repo.store.sync();
      await repo.index.removeVersion(v.id);
    }
    repo.trust.noteAttributes(
      repo.id,
      versions.map((v) => [v.id, null]),
    );
  } finally {
    for (const l of locks) await l.release();
  }
}

export function removeVersion(repo: Repository, v: VersionRecord): Promise<void> {
  return removeVersions(repo, [v]);
}

/**
 * Throws when `v` may not be removed: a protected version is refused always, as in backy2 ("cannot be
 * deleted until you decide that it's not needed anymore"); only `unprotect` lifts protection. (The minimum
 * age is checked by the callers, and --force overrides only that.)
 */
export function assertRemovable(v: VersionRecord): void {
  if (v.protected) throw new RefusedError(`Version ${v.id} is protected; run "blocksafe unprotect ${v.id}" first if it is really no longer needed. Nothing was removed.`);
}
