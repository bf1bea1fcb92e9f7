/**
 * The UI's engine backend (ui/engineBackend.ts) on a real repository: a target that another process is
 * restoring to right now is refused as such (not offered as an "interrupted" restore to resume or
 * overwrite); once that process is gone, its restore is offered for resume at its checkpoint.
 */
import * as path from 'node:path';
import test from 'ava';
import { engineConnect } from '../ui/engineBackend.js';
import { pausePoints, spawnCli } from './cliHarness.js';
import { backupJson, initKeyFileRepo, makeImage, MiB, tempDir } from './helpers.js';

test('a restore running in another process is "being restored right now", not interrupted', async (t) => {
  const dir = await tempDir(t, 'blocksafe-ui-engine-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'a.img'), { blockSize: MiB, seed: 'running', blocks: ['random', 'random', 'text'] });
  const v = await backupJson(repo, image.path, 'a');
  const target = path.join(dir, 'out.img');
  const pause = await pausePoints(t);
  // The CLI restore stops (holding its target lock) right after it recorded its state.
  const bg = spawnCli(['restore', ...repo.args, v.id, target], { ...repo.env, ...pause.env('restore.started') });
  t.teardown(() => bg.child.kill('SIGKILL'));
  t.true(await pause.reached('restore.started', bg));

  const { connect } = engineConnect({ repo: repo.dir, keyFile: repo.keyFile });
  let backend = await connect(async () => '');
  const version = backend.listVersions().find((x) => x.id === v.id)!;
  let info = await backend.inspectTarget(target, version);
  t.regex(info.refusal ?? '', new RegExp(`is being restored right now by pid ${bg.pid} on `));
  t.is(info.interrupted, null);
  await backend.close();

  // The process dies (kill -9): its restore is now interrupted, offered at its checkpoint.
  await bg.kill9();
  backend = await connect(async () => '');
  info = await backend.inspectTarget(target, version);
  t.is(info.refusal, null);
  t.is(info.interrupted?.version, v.id);
  await backend.close();
});
