import { RefusedError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import { acquireLock, LockNames, type Lock } from './locks.js';
import type { Repository } from './repository.js';

/**
 * Removes versions, all or none: every one is checked and locked (exclusively: a restore, scrub or NBD
 * export holding one makes the removal fail with exit code 4) before any is touched. For each, its manifest
 * and attributes go from the store (so an index rebuild does not bring it back), then its index entries.
 * Its blocks stay until a cleanup finds them unreferenced.
 */
export async function removeVersions(repo: Repository, versions: VersionRecord[], force: boolean): Promise<void> {
  for (const v of versions) assertRemovable(v, force);
  const locks: Lock[] = [];
  try {
    for (const v of versions) locks.push(await acquireLock(repo.index, LockNames.version(v.id), 'exclusive', `Version ${v.id}`));
    for (const v of versions) {
      await repo.store.delete([ObjectNames.manifest(v.id), ObjectNames.attributes(v.id)]);
      await repo.store.sync();
      await repo.index.removeVersion(v.id);
    }
  } finally {
    for (const l of locks) await l.release();
  }
}

export function removeVersion(repo: Repository, v: VersionRecord, force: boolean): Promise<void> {
  return removeVersions(repo, [v], force);
}

/** Throws when `v` may not be removed. */
export function assertRemovable(v: VersionRecord, force: boolean): void {
  if (v.protected && !force) throw new RefusedError(`Version ${v.id} is protected; unprotect it first or use --force. Nothing was removed.`);
}
