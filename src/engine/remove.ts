import { RefusedError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import { LockNames, withLock } from './locks.js';
import type { Repository } from './repository.js';

/**
 * Removes a version: its manifest from the store (so an index rebuild does not bring it back), then its
 * index entries. Its blocks stay until a cleanup finds them unreferenced.
 */
export async function removeVersion(repo: Repository, v: VersionRecord, force: boolean): Promise<void> {
  assertRemovable(v, force);
  // Exclusive: a restore (shared holder) of this version makes the removal fail with exit code 4.
  await withLock(repo.index, LockNames.version(v.id), 'exclusive', `Version ${v.id}`, async () => {
    await repo.store.delete([ObjectNames.manifest(v.id), ObjectNames.attributes(v.id)]);
    await repo.store.sync();
    await repo.index.removeVersion(v.id);
  });
}

/** Throws when `v` may not be removed (checked for every version before any is removed). */
export function assertRemovable(v: VersionRecord, force: boolean): void {
  if (v.protected && !force) throw new RefusedError(`Version ${v.id} is protected; unprotect it first or use --force. Nothing was removed.`);
}
