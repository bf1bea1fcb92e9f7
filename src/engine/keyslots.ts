import { createSlot, type KeySlot } from '../codec/keys.js';
import { RefusedError, UsageError } from '../errors.js';
import { ObjectNames } from '../store/blobstore.js';
import { readSlots, type Repository, type Secret } from './repository.js';

/** Key slots: several passphrases or key files open the same master key; data is never re-encrypted. */
function requireEncrypted(repo: Repository): Uint8Array {
  if (!repo.masterKey) throw new UsageError('This repository is not encrypted (encryption = none): it has no key slots.');
  return repo.masterKey;
}

export async function listSlots(repo: Repository): Promise<KeySlot[]> {
  requireEncrypted(repo);
  return readSlots(repo.store);
}

export async function addSlot(repo: Repository, secret: Secret): Promise<KeySlot> {
  const master = requireEncrypted(repo);
  const slots = await readSlots(repo.store);
  const id = Math.max(0, ...slots.map((s) => s.id)) + 1;
  const slot = createSlot(id, secret.type, secret.value, master);
  await repo.store.put(ObjectNames.slot(id), Buffer.from(JSON.stringify(slot, null, 2)));
  await repo.store.sync();
  return slot;
}

export async function removeSlot(repo: Repository, id: number): Promise<void> {
  requireEncrypted(repo);
  const slots = await readSlots(repo.store);
  if (!slots.some((s) => s.id === id)) throw new UsageError(`There is no key slot ${id}; "blocksafe key list" shows the slots.`);
  if (slots.length === 1) throw new RefusedError('This is the last key slot; removing it would lock everyone out. Add another slot first.');
  await repo.store.delete([ObjectNames.slot(id)]);
  await repo.store.sync();
}

/** Replaces the slot that the current secret opened with one for the new secret (same slot id). */
export async function changeSecret(repo: Repository, secret: Secret): Promise<KeySlot> {
  const master = requireEncrypted(repo);
  const id = repo.openedSlot!;
  const slot = createSlot(id, secret.type, secret.value, master);
  await repo.store.put(ObjectNames.slot(id), Buffer.from(JSON.stringify(slot, null, 2)));
  await repo.store.sync();
  return slot;
}
