/**
 * The UI's engine backend (ui/engineBackend.ts) on a real repository: a target that another process is
 * restoring to right now is refused as such (not offered as an "interrupted" restore to resume or
 * overwrite); once that process is gone, its restore is offered for resume at its checkpoint. An rbd://
 * target on the real Ceph cluster: inspected (new / existing / watched) and restored byte-identical.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import test from 'ava';
import { engineConnect } from '../ui/engineBackend.js';
import { pausePoints, spawnCli, waitFor } from './cliHarness.js';
import { backupJson, initKeyFileRepo, makeImage, MiB, sha256File, tempDir } from './helpers.js';

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

test('rbd:// target on the real cluster: new image inspected and restored byte-identical; then existing; then watched', async (t) => {
  const conf = path.join(process.env.BLOCKSAFE_TEST_RGW_DIR ?? '/tmp/blocksafe-test-rgw', 'ceph.conf');
  const up = spawnSync('rbd', ['-c', conf, '--client_mount_timeout', '10', 'ls', 'rbd'], { stdio: 'ignore', timeout: 30_000 }).status === 0;
  if (!up) {
    if (process.env.CI === 'true') t.fail(`no Ceph cluster with pool rbd at ${conf}`);
    else t.pass('no Ceph cluster: skipped');
    return;
  }
  process.env.CEPH_CONF = conf; // the rbd client takes the cluster from the environment when [ceph] names none
  const dir = await tempDir(t, 'blocksafe-ui-rbd-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'a.img'), { blockSize: MiB, seed: 'rbd', blocks: ['random', 'zero', 'text', 'random'] });
  const v = await backupJson(repo, image.path, 'a');
  const name = `bstest-ui-${randomBytes(4).toString('hex')}`;
  const uri = `rbd://rbd/${name}`;
  t.teardown(() => void spawnSync('rbd', ['-c', conf, 'rm', '--no-progress', `rbd/${name}`], { stdio: 'ignore' }));

  const { connect } = engineConnect({ repo: repo.dir, keyFile: repo.keyFile });
  const backend = await connect(async () => '');
  t.teardown(() => backend.close());
  const version = backend.listVersions().find((x) => x.id === v.id)!;
  let info = await backend.inspectTarget(uri, version);
  t.like(info, { kind: 'new-rbd', refusal: null, overwrites: false, name });
  const out = await backend.restore(version, { target: uri, force: false, resume: false }, () => undefined, new AbortController().signal);
  t.deepEqual(out.damaged, []);
  const exported = path.join(dir, 'export.img');
  t.is(spawnSync('rbd', ['-c', conf, 'export', '--no-progress', `rbd/${name}`, exported]).status, 0);
  t.is(await sha256File(exported), await sha256File(image.path));

  info = await backend.inspectTarget(uri, version);
  t.like(info, { kind: 'rbd', refusal: null, overwrites: true, size: version.size });

  // A watcher (what a VM holds) makes it unusable, typed confirmation or not.
  // rbd watch runs until a line arrives on stdin: keep stdin open, end it for a clean unwatch.
  const watch = spawn('rbd', ['-c', conf, 'watch', `rbd/${name}`], { stdio: ['pipe', 'ignore', 'ignore'] });
  const status = () => (JSON.parse(spawnSync('rbd', ['-c', conf, 'status', '--format', 'json', `rbd/${name}`]).stdout.toString()) as { watchers: unknown[] }).watchers.length;
  t.teardown(async () => {
    watch.stdin.end('\n'); // a clean unwatch (a killed watcher lingers until its timeout, and the image cannot be removed)
    await waitFor('the watcher to go', () => (status() === 0 ? true : undefined), 120_000, 200);
  });
  await waitFor('the watcher', () => (status() > 0 ? true : undefined));
  info = await backend.inspectTarget(uri, version);
  t.regex(info.refusal ?? '', new RegExp(`RBD image rbd/${name} is in use \\(watched by .*not even with a typed confirmation`));
  await t.throwsAsync(
    backend.restore(version, { target: uri, force: true, resume: false }, () => undefined, new AbortController().signal),
    { message: /is in use/ },
  );
  t.is(spawnSync('rbd', ['-c', conf, 'export', '--no-progress', `rbd/${name}`, `${exported}.2`]).status, 0);
  t.is(await sha256File(`${exported}.2`), await sha256File(image.path), 'the watched image was left alone');
});
