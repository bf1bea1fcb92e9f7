import { randomBytes } from 'node:crypto';
import { createSlot, newMasterKey } from '../codec/keys.js';
import { objectKeyId, ObjectType } from '../codec/object.js';
import { LockedError, UsageError } from '../errors.js';
import type { BlockRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { LockNames, withLock } from './locks.js';
import type { ProgressListener } from './progress.js';
import { readSlots, type Repository, type Secret } from './repository.js';
import { pausePoint } from '../util/pause.js';

export interface RekeyResult {
  key_id: number;
  started_new_key: boolean;
  blocks_rewritten: number;
  metadata_rewritten: number;
  /** Key ids removed from the keyring because nothing uses them any more. */
  retired_keys: number[];
  /** Why old keys were kept, when they were. */
  kept_because: string | null;
  /** With a master-key rotation: the new slot of the secret used, and the slots removed (they open only the old master key). */
  master_rotated: boolean;
  new_slot: number | null;
  removed_slots: number[];
}

export interface RekeyOptions {
  threads: number;
  queueDepth: number;
  /** Also replace the master key (re-wrapped for the secret the repository was opened with). */
  master?: boolean;
  onProgress?: ProgressListener;
}

/**
 * Key rotation: introduces a new data key id (new objects are written with it from then on), re-encrypts
 * every block, manifest and attributes object still under an older key, and finally retires old keys that
 * nothing uses. Runs alongside backups and restores (their workers read the keyring again when they meet
 * the new key id); resumable (a second run continues the rotation in progress instead of starting another).
 * Old keys are retired only while no other process holds the repository's keys (`keys` lock, here or on
 * another machine): one that loaded the old keyring may still write with an old key.
 *
 * With `master`, the master key is replaced as well, once the old data keys are retired: the keyring is
 * sealed under a new master key, the opening secret gets a new slot for it, and every other slot (they wrap
 * the old master key) is removed. Someone holding an old slot and its passphrase (or a copy of the old
 * keyring) can then read nothing written afterwards. The MAC key that names blocks is not rotated
 * (docs/SECURITY.md).
 */
export async function rekey(repo: Repository, opts: RekeyOptions): Promise<RekeyResult> {
  if (!repo.masterKey) throw new UsageError('This repository is not encrypted (encryption = none): there is no data key to rotate.');
  return withLock(repo.locks, LockNames.rekey, 'exclusive', 'Key rotation', () => runRekey(repo, opts));
}

async function runRekey(repo: Repository, opts: RekeyOptions): Promise<RekeyResult> {
  const inProgress = repo.index.getMeta<number | null>('rekey_target');
  let started = false;
  if (inProgress !== repo.keyring.currentKeyId) {
    const id = Math.max(...repo.keyring.dataKeys.keys()) + 1;
    repo.keyring.dataKeys.set(id, new Uint8Array(randomBytes(32)));
    repo.keyring.currentKeyId = id;
    await repo.saveKeyring();
    await repo.index.putMeta('rekey_target', id);
    started = true;
  }
  const current = repo.keyring.currentKeyId;
  const result: RekeyResult = {
    key_id: current,
    started_new_key: started,
    blocks_rewritten: 0,
    metadata_rewritten: 0,
    retired_keys: [],
    kept_because: null,
    master_rotated: false,
    new_slot: null,
    removed_slots: [],
  };
  await pausePoint('rekey.started');
  // A pipeline whose workers know the (possibly new) keyring.
  const pipeline = await BlockPipeline.start(repo, opts.threads);
  try {
    const todo: { checksum: Buffer; record: BlockRecord }[] = [];
    for (const { checksum, record } of repo.index.allBlocks()) if (record.key_id !== current) todo.push({ checksum, record });
    const total = todo.reduce((n, b) => n + b.record.size, 0);
    let done = 0;
    // Compare-and-set: a record a cleanup removed meanwhile must not come back, one a backup re-stored stays.
    let updates: { checksum: Buffer; expect: BlockRecord; next: BlockRecord }[] = [];
    await orderedWindow<BlockRecord | null>(
      todo.length,
      opts.queueDepth,
      async (i) => {
        const { checksum, record } = todo[i]!;
        const raw = await repo.store.tryGet(ObjectNames.block(checksum.toString('hex')));
        if (!raw) return null; // missing: scrub reports it
        if (objectKeyId(raw) === current) return { ...record, key_id: current, stored: raw.length };
        const plain = await pipeline.load(checksum, record.size);
        return { ...(await pipeline.rewrite(plain, checksum)), valid: record.valid };
      },
      async (i, rec) => {
        const { checksum, record } = todo[i]!;
        done += record.size;
        if (rec) {
          if (rec.stored !== record.stored || record.key_id !== current) result.blocks_rewritten++;
          updates.push({ checksum, expect: record, next: rec });
        }
        if (updates.length >= 64) {
          await repo.store.sync();
          await repo.index.updateBlocksIf(updates);
          updates = [];
        }
        opts.onProgress?.({ phase: 'rekey', doneBytes: done, totalBytes: total, damaged: 0 });
      },
    );
    await repo.store.sync();
    await repo.index.updateBlocksIf(updates);
    result.metadata_rewritten = await reencryptMetadata(repo, current);
  } finally {
    await pipeline.close();
  }
  await pausePoint('rekey.retire');
  await retireOldKeys(repo, current, result, opts.master);
  return result;
}

async function reencryptMetadata(repo: Repository, current: number): Promise<number> {
  let n = 0;
  for (const [prefix, type] of [
    [ObjectNames.manifestPrefix, ObjectType.Manifest],
    [ObjectNames.attributesPrefix, ObjectType.Attributes],
    [null, ObjectType.GcState],
  ] as const) {
    const names: string[] = prefix === null ? [ObjectNames.gcGeneration] : [];
    if (prefix !== null) for await (const { name } of repo.store.list(prefix)) names.push(name);
    for (const name of names) {
      const raw = await repo.store.tryGet(name);
      if (!raw || objectKeyId(raw) === current) continue;
      await repo.store.put(name, repo.encodeMeta(type, repo.decodeMeta(type, raw, name), name));
      n++;
    }
  }
  await repo.store.sync();
  return n;
}

/**
 * Removes old data keys when no block record uses them and no other process holds the keys (it may still
 * write with an old key); then, if asked, replaces the master key.
 */
async function retireOldKeys(repo: Repository, current: number, result: RekeyResult, master: boolean | undefined): Promise<void> {
  let keysLock;
  try {
    keysLock = await repo.locks.acquire(LockNames.keys, 'exclusive', 'The repository keys');
  } catch (err) {
    if (!(err instanceof LockedError)) throw err;
    result.kept_because = `other processes use the repository (${err.message.replace(/^The repository keys is locked by /, '').replace(/; wait.*$/, '')}); run rekey again later to retire the old keys`;
    return;
  }
  try {
    for (const { record } of repo.index.allBlocks()) {
      if (record.key_id !== current) {
        result.kept_because = 'some blocks are still under an old key (missing or unreadable objects); run scrub, then rekey again';
        return;
      }
    }
    const old = [...repo.keyring.dataKeys.keys()].filter((id) => id !== current);
    if (old.length > 0) {
      for (const id of old) repo.keyring.dataKeys.delete(id);
      await repo.saveKeyring();
      result.retired_keys = old;
    }
    // The rotation is over: the next rekey starts a new one.
    await repo.index.putMeta('rekey_target', null);
    if (master) await rotateMasterKey(repo, repo.openedWith!, result);
  } finally {
    await keysLock.release();
  }
}

/**
 * New master key: a new slot for `secret` first (its old slot still opens the old keyring if we stop
 * here), then the keyring sealed under the new key, then every other slot removed (unlock tries each slot
 * the secret opens and keeps the one that opens the keyring, so every crash point leaves a way in).
 */
async function rotateMasterKey(repo: Repository, secret: Secret, result: RekeyResult): Promise<void> {
  const slots = await readSlots(repo.store);
  const masterKey = newMasterKey();
  const id = Math.max(0, ...slots.map((s) => s.id)) + 1;
  await repo.store.put(ObjectNames.slot(id), Buffer.from(JSON.stringify(createSlot(id, secret.type, secret.value, masterKey), null, 2)));
  await repo.store.sync();
  repo.masterKey = masterKey;
  await repo.saveKeyring();
  await repo.store.delete(slots.map((s) => ObjectNames.slot(s.id)));
  await repo.store.sync();
  repo.openedSlot = id;
  result.master_rotated = true;
  result.new_slot = id;
  result.removed_slots = slots.map((s) => s.id);
}
