/**
 * The fault-injecting store wrapper itself (src/store/faulty.ts): refused without its guard, faults at the
 * Nth call, and the power-loss journal rolling back exactly what DirectoryStore had not made durable.
 */
import test from 'ava';
import { existsSync, readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { DirectoryStore } from '../src/store/directory.js';
import { FAULT_ENV, FAULT_GUARD, FAULT_GUARD_ENV, injectFaultsFromEnv, recoverPowerLoss } from '../src/store/faulty.js';
import { assertCliError, runCli, tempDir } from './helpers.js';

const env = (spec: object) => ({ [FAULT_ENV]: JSON.stringify(spec), [FAULT_GUARD_ENV]: FAULT_GUARD });

test('the spec without its guard is refused with one line (exit 2), by the CLI too', async (t) => {
  const dir = await tempDir(t);
  t.throws(() => injectFaultsFromEnv(new DirectoryStore(dir), { [FAULT_ENV]: '{"faults":[]}' }), { message: /test-only setting/ });
  const r = await runCli(['ls', '--repo', path.join(dir, 'none')], { env: { [FAULT_ENV]: '{"faults":[]}' } });
  assertCliError(t, r, 2, /BLOCKSAFE_TEST_FAULTS is a test-only setting/);
});

test('the Nth put fails with ENOSPC, the Nth get comes back bit-flipped; others are untouched; the log counts them', async (t) => {
  const dir = await tempDir(t);
  const log = path.join(dir, 'faults.log');
  const store = injectFaultsFromEnv(
    new DirectoryStore(path.join(dir, 'repo')),
    env({
      faults: [
        { op: 'put', nth: 2, kind: 'enospc' },
        { op: 'get', nth: 1, kind: 'bitflip' },
      ],
      log,
    }),
  );
  const a = Buffer.alloc(100, 1);
  await store.put('data/aa/a', a);
  await t.throwsAsync(store.put('data/bb/b', a), { message: /no space left/ });
  await store.put('data/cc/c', a);
  t.false(await store.has('data/bb/b'));
  t.notDeepEqual(await store.get('data/aa/a'), a, 'first get: one bit flipped');
  t.deepEqual(await store.get('data/aa/a'), a, 'second get: the object itself is fine');
  t.is(readFileSync(log, 'utf8').trim().split('\n').length, 2);
});

test('power loss: unsynced new objects go, replaced and deleted ones come back, synced ones stay', async (t) => {
  const dir = await tempDir(t);
  const root = path.join(dir, 'repo');
  const journal = path.join(dir, 'journal');
  const store = injectFaultsFromEnv(new DirectoryStore(root), env({ faults: [], journal }));
  const v1 = Buffer.from('old');
  await store.put('data/aa/synced', v1);
  await store.put('manifests/m', v1);
  await store.put('data/bb/doomed', v1);
  await store.sync();
  // after the last sync: nothing below is durable
  await store.put('data/cc/new', Buffer.from('new'));
  await store.put('manifests/m', Buffer.from('replaced'));
  await store.delete(['data/bb/doomed']);
  const r = recoverPowerLoss(journal, { cut: 0, tear: 0, random: () => 0.5 });
  t.is(r.undone, 3);
  t.deepEqual(await fs.readFile(path.join(root, 'data/aa/synced')), v1);
  t.false(existsSync(path.join(root, 'data/cc/new')), 'the new object is gone');
  t.false(existsSync(path.join(root, 'data/cc')), 'with the directory it created');
  t.deepEqual(await fs.readFile(path.join(root, 'manifests/m')), v1, 'the replaced object is back');
  t.deepEqual(await fs.readFile(path.join(root, 'data/bb/doomed')), v1, 'the deleted object is back');
  t.false(existsSync(journal), 'the journal is consumed');
});

test('power loss with everything kept: a new block whose data no fsync covered may be torn; a manifest never is', async (t) => {
  const dir = await tempDir(t);
  const root = path.join(dir, 'repo');
  const journal = path.join(dir, 'journal');
  const store = injectFaultsFromEnv(new DirectoryStore(root), env({ faults: [], journal }));
  await store.put('data/aa/block', Buffer.alloc(1000, 7));
  await store.put('manifests/m', Buffer.alloc(1000, 8));
  const r = recoverPowerLoss(journal, { cut: 1, tear: 1, random: () => 0.5 });
  t.is(r.undone, 0);
  t.deepEqual(r.torn, [path.join(root, 'data/aa/block')]);
  t.is((await fs.stat(path.join(root, 'data/aa/block'))).size, 500);
  t.is((await fs.stat(path.join(root, 'manifests/m'))).size, 1000, 'fsynced before its rename (fsyncedBeforeRename)');
});
