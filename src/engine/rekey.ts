import { randomBytes } from 'node:crypto';
import { objectKeyId, ObjectType } from '../codec/object.js';
import { UsageError } from '../errors.js';
import type { BlockRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { saveKeyring } from './keyslots.js';
import { isStale } from './locks.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';

export interface RekeyResult {
  key_id: number;
  started_new_key: boolean;
  blocks_rewritten: number;
  metadata_rewritten: number;
  /** Key ids removed from the keyring because nothing uses them any more. */
  retired_keys: number[];
  /** Why old keys were kept, when they were. */
  kept_because: string | null;
}

/**
 * Key rotation: introduces a new data key id (new objects are written with it from then on), re-encrypts
 * every block, manifest and attributes object still under an older key, and finally retires old keys that
 * nothing uses. Runs alongside backups and restores; resumable (a second run continues the rotation in
 * progress instead of starting another); old keys stay readable until no object uses them.
 */
export async function rekey(repo: Repository, threads: number, queueDepth: number, onProgress?: ProgressListener): Promise<RekeyResult> {
  if (!repo.masterKey) throw new UsageError('This repository is not encrypted (encryption = none): there is no data key to rotate.');
  const inProgress = repo.index.getMeta<number | null>('rekey_target');
  let started = false;
  if (inProgress !== repo.keyring.currentKeyId) {
    const id = Math.max(...repo.keyring.dataKeys.keys()) + 1;
    repo.keyring.dataKeys.set(id, new Uint8Array(randomBytes(32)));
    repo.keyring.currentKeyId = id;
    await saveKeyring(repo);
    await repo.index.putMeta('rekey_target', id);
    started = true;
  }
  const current = repo.keyring.currentKeyId;
  const result: RekeyResult = { key_id: current, started_new_key: started, blocks_rewritten: 0, metadata_rewritten: 0, retired_keys: [], kept_because: null };
  // A pipeline whose workers know the (possibly new) keyring.
  const pipeline = BlockPipeline.start(repo, threads);
  try {
    const todo: { checksum: Buffer; record: BlockRecord }[] = [];
    for (const { checksum, record } of repo.index.allBlocks()) if (record.key_id !== current) todo.push({ checksum, record });
    const total = todo.reduce((n, b) => n + b.record.size, 0);
    let done = 0;
    let updates: [Buffer, BlockRecord][] = [];
    await orderedWindow<BlockRecord | null>(
      todo.length,
      queueDepth,
      async (i) => {
        const { checksum, record } = todo[i]!;
        const raw = await repo.store.tryGet(ObjectNames.block(checksum.toString('hex')));
        if (!raw) return null; // missing: scrub reports it
        if (objectKeyId(raw) === current) return { ...record, key_id: current, stored: raw.length };
        const plain = await pipeline.load(checksum, record.size);
        return { ...(await pipeline.rewrite(plain, checksum)), valid: record.valid };
      },
      async (i, rec) => {
        done += todo[i]!.record.size;
        if (rec) {
          if (rec.stored !== todo[i]!.record.stored || todo[i]!.record.key_id !== current) result.blocks_rewritten++;
          updates.push([todo[i]!.checksum, rec]);
        }
        if (updates.length >= 64) {
          await repo.store.sync();
          await repo.index.updateBlocks(updates);
          updates = [];
        }
        onProgress?.({ phase: 'rekey', doneBytes: done, totalBytes: total, damaged: 0 });
      },
    );
    await repo.store.sync();
    await repo.index.updateBlocks(updates);
    result.metadata_rewritten = await reencryptMetadata(repo, current);
  } finally {
    await pipeline.close();
  }
  await retireOldKeys(repo, current, result);
  return result;
}

async function reencryptMetadata(repo: Repository, current: number): Promise<number> {
  let n = 0;
  for (const [prefix, type] of [
    [ObjectNames.manifestPrefix, ObjectType.Manifest],
    [ObjectNames.attributesPrefix, ObjectType.Attributes],
  ] as const) {
    const names: string[] = [];
    for await (const name of repo.store.list(prefix)) names.push(name);
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

/** Removes old data keys when no block record uses them and no backup that may still write with them runs. */
async function retireOldKeys(repo: Repository, current: number, result: RekeyResult): Promise<void> {
  const running = [...repo.index.allLocks()].filter((l) => l.resource.startsWith('volume:') && !isStale(l));
  if (running.length > 0) {
    result.kept_because = `backups were running (${running.map((l) => l.resource.slice('volume:'.length)).join(', ')}); run rekey again later to retire the old keys`;
    return;
  }
  for (const { record } of repo.index.allBlocks()) {
    if (record.key_id !== current) {
      result.kept_because = 'some blocks are still under an old key (missing or unreadable objects); run scrub, then rekey again';
      return;
    }
  }
  const old = [...repo.keyring.dataKeys.keys()].filter((id) => id !== current);
  if (old.length > 0) {
    for (const id of old) repo.keyring.dataKeys.delete(id);
    await saveKeyring(repo);
    result.retired_keys = old;
  }
  // The rotation is over: the next rekey starts a new one.
  await repo.index.putMeta('rekey_target', null);

}
