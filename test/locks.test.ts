/**
 * Locks and concurrency through the real CLI: independent operations on one repository run at the same
 * time; a real conflict fails fast with exit code 4 naming the holder (pid and command); a lock left by a
 * process killed with SIGKILL is detected as stale and taken over.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test from 'ava';
import { assertCliError, initRepo, MiB, runCli, runJson, sha256File, type RepoFixture } from './helpers.js';
import { fastTempDir, killOnTeardown, type FullVersion, lsJson, randomFile, spawnCli, waitFor, writeConfig } from './cliHarness.js';

type V = FullVersion;

async function setup(t: Parameters<typeof fastTempDir>[0]): Promise<{ dir: string; repo: RepoFixture; slow: string; crawl: string }> {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  // 10 MiB/s: 6 s for a throttled backup or restore of 60 MiB (operations that must finish)
  const slow = await writeConfig(dir, 'slow.conf', { read_limit: '10M', write_limit: '10M' });
  // 1 MiB/s: lock holders that are killed once the conflicts are checked (they must not finish first,
  // however loaded the machine is)
  const crawl = await writeConfig(dir, 'crawl.conf', { read_limit: '1M', write_limit: '1M' });
  return { dir, repo, slow, crawl };
}

/** Waits until `name` has an incomplete version that has committed some blocks (its backup holds the volume lock). */
function backupRunning(repo: RepoFixture, name: string, alive: () => boolean): Promise<V> {
  return waitFor(`the backup of ${name} to be running`, async () => {
    if (!alive()) throw new Error(`the backup of ${name} ended too early`);
    return (await lsJson(repo, name)).find((v) => !v.complete) as V | undefined;
  });
}

/** Waits until a restore has created its target (it holds its locks from before that point). */
function restoreRunning(target: string, alive: () => boolean): Promise<true> {
  return waitFor(`the restore to ${target} to be running`, async () => {
    if (!alive()) throw new Error(`the restore to ${target} ended too early`);
    try {
      await fs.stat(target);
      return true;
    } catch {
      return undefined;
    }
  });
}

test('two backups of different names and a restore of a third version run at the same time and all succeed', async (t) => {
  const { dir, repo, slow } = await setup(t);
  const [a, b, c] = ['a', 'b', 'c'].map((n) => path.join(dir, `${n}.img`)) as [string, string, string];
  await Promise.all([randomFile(a, 60 * MiB, 'lock-a'), randomFile(b, 60 * MiB, 'lock-b'), randomFile(c, 60 * MiB, 'lock-c')]);
  const vc = await runJson<V>(['backup', ...repo.args, c, 'vol-c'], { env: repo.env });
  const target = path.join(dir, 'c.restored');

  const ba = killOnTeardown(t, spawnCli(['--config', slow, 'backup', ...repo.args, a, 'vol-a', '--json'], repo.env));
  const bb = killOnTeardown(t, spawnCli(['--config', slow, 'backup', ...repo.args, b, 'vol-b', '--json'], repo.env));
  const rc = killOnTeardown(t, spawnCli(['--config', slow, 'restore', ...repo.args, vc.id, target, '--json'], repo.env));
  const alive = () => !ba.exited() && !bb.exited() && !rc.exited();

  // All three are in the middle of their work at one moment.
  await waitFor('both backups and the restore to be under way at once', async () => {
    if (!alive()) throw new Error(`an operation ended before the others were under way: ${ba.stderr()}${bb.stderr()}${rc.stderr()}`);
    const vs = (await lsJson(repo)) as V[];
    const running = (name: string) => vs.some((v) => v.name === name && !v.complete);
    const targetThere = await fs.stat(target).then(
      () => true,
      () => false,
    );
    return running('vol-a') && running('vol-b') && targetThere && alive() ? true : undefined;
  });

  const [ra, rb, rr] = await Promise.all([ba.done, bb.done, rc.done]);
  for (const [what, r] of [
    ['backup a', ra],
    ['backup b', rb],
    ['restore c', rr],
  ] as const) {
    t.is(r.code, 0, `${what}: ${r.stderr}`);
  }
  const va = JSON.parse(ra.stdout) as V;
  const vb = JSON.parse(rb.stdout) as V;
  t.true(va.complete && vb.complete);
  t.deepEqual(JSON.parse(rr.stdout).damaged, []);
  t.is(await sha256File(target), await sha256File(c), 'the concurrent restore is byte-identical');
  for (const [v, src] of [
    [va, a],
    [vb, b],
  ] as const) {
    const out = path.join(dir, `${v.id}.restored`);
    await runJson(['restore', ...repo.args, v.id, out], { env: repo.env });
    t.is(await sha256File(out), await sha256File(src), `version ${v.name} backed up concurrently restores byte-identical`);
  }
});

test('a second backup of the same name while one runs: exit 4 naming the holder; once the holder is killed -9, its stale lock is taken over', async (t) => {
  const { dir, repo, crawl } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, 48 * MiB, 'lock-same'); // ~48 s throttled: it is killed long before the end
  const first = killOnTeardown(t, spawnCli(['--config', crawl, 'backup', ...repo.args, img, 'disk'], repo.env));
  const running = await backupRunning(repo, 'disk', () => !first.exited());

  const r = await runCli(['backup', ...repo.args, img, 'disk'], { env: repo.env });
  const msg = assertCliError(t, r, 4, /locked/i);
  t.regex(msg, new RegExp(`pid ${first.pid}\\b`), "names the holder's pid");
  t.regex(msg, /"blocksafe .*backup .*disk"/, "names the holder's command");
  t.true(msg.includes('"disk"'), 'names the volume');
  // --resume is refused the same way: the incomplete version belongs to a live backup
  const r2 = await runCli(['backup', ...repo.args, img, 'disk', '--resume'], { env: repo.env });
  assertCliError(t, r2, 4, new RegExp(`pid ${first.pid}\\b`));
  t.false(first.exited(), 'the holder was running during both attempts');
  t.deepEqual(
    (await lsJson(repo, 'disk')).map((v) => v.id),
    [running.id],
    'the refused attempts created nothing',
  );

  // Stale lock: the holder dies without releasing its lock.
  t.is((await first.kill9()).signal, 'SIGKILL');
  const again = await runCli(['backup', ...repo.args, img, 'disk', '--json'], { env: repo.env });
  t.is(again.code, 0, `the dead pid's lock is taken over: ${again.stderr}`);
  const v = JSON.parse(again.stdout) as V;
  t.true(v.complete);
  t.not(v.id, running.id);
  const out = path.join(dir, 'out.img');
  await runJson(['restore', ...repo.args, v.id, out], { env: repo.env });
  t.is(await sha256File(out), await sha256File(img));
});

test('rm of a version while it is restored: exit 4 naming the restore; a restore elsewhere runs alongside; after kill -9 of the restore, rm works', async (t) => {
  const { dir, repo, crawl } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, 48 * MiB, 'lock-rm');
  const v = await runJson<V>(['backup', ...repo.args, img, 'disk'], { env: repo.env });
  const target = path.join(dir, 't.img');
  const restore = killOnTeardown(t, spawnCli(['--config', crawl, 'restore', ...repo.args, v.id, target], repo.env));
  await restoreRunning(target, () => !restore.exited());

  const rm = await runCli(['rm', ...repo.args, v.id], { env: repo.env });
  const msg = assertCliError(t, rm, 4, new RegExp(`pid ${restore.pid}\\b`));
  t.regex(msg, /"blocksafe .*restore /, "names the holder's command");
  t.true(msg.includes(v.id));

  const other = await runCli(['restore', ...repo.args, v.id, path.join(dir, 'elsewhere.img'), '--json'], { env: repo.env });
  t.is(other.code, 0, `a restore of the same version to another target runs alongside: ${other.stderr}`);
  t.false(restore.exited(), 'the conflict was detected while the restore was running');
  t.deepEqual((await lsJson(repo)).map((x) => x.id), [v.id], 'the version survived the refused rm');
  t.is(await sha256File(path.join(dir, 'elsewhere.img')), await sha256File(img));

  // The restore dies holding its locks: they are stale, so rm goes ahead.
  t.is((await restore.kill9()).signal, 'SIGKILL');
  const rmLater = await runCli(['rm', ...repo.args, v.id], { env: repo.env });
  t.is(rmLater.code, 0, rmLater.stderr);
  t.deepEqual(await lsJson(repo), []);
});

/**
 * Lock keys are "<resource>\0<holder>" strings in LMDB; a conflict must be found for short and long
 * resources alike. The long cases have resource names ("volume:…", "target:…") of 58 characters: the
 * resource alone is shorter than 64 characters, the resource plus the holder's key longer.
 */
test('a second backup of a running volume is refused whatever the length of its name', async (t) => {
  const { dir, repo, crawl } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, 48 * MiB, 'lock-len-b');
  const names = ['n', 'v'.repeat(58 - 'volume:'.length)];
  const jobs = names.map((n) => killOnTeardown(t, spawnCli(['--config', crawl, 'backup', ...repo.args, img, n], repo.env)));
  const alive = () => jobs.every((j) => !j.exited());
  for (const n of names) await backupRunning(repo, n, alive);
  for (const [i, n] of names.entries()) {
    const r = await runCli(['backup', ...repo.args, img, n], { env: repo.env });
    t.is(r.code, 4, `a second backup of "${n}" (${n.length} characters) is refused: ${r.stderr}${r.stdout}`);
    t.regex(r.stderr, new RegExp(`pid ${jobs[i]!.pid}\\b`));
  }
  t.true(alive(), 'all holders were running during the attempts');
});

test('a second restore to a target being restored is refused whatever the length of its path', async (t) => {
  const { dir, repo, crawl } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, 48 * MiB, 'lock-len-r');
  const v = await runJson<V>(['backup', ...repo.args, img, 'seed'], { env: repo.env });
  const targets = [path.join(dir, 't'), path.join(dir, 't'.repeat(Math.max(1, 58 - 'target:'.length - dir.length - 1)))];
  const jobs = targets.map((p) => killOnTeardown(t, spawnCli(['--config', crawl, 'restore', ...repo.args, v.id, p], repo.env)));
  const alive = () => jobs.every((j) => !j.exited());
  for (const p of targets) await restoreRunning(p, alive);
  for (const [i, p] of targets.entries()) {
    const r = await runCli(['restore', ...repo.args, v.id, p, '--force'], { env: repo.env });
    t.is(r.code, 4, `a second restore to ${p} (${p.length} characters) is refused: ${r.stderr}`);
    t.regex(r.stderr, new RegExp(`pid ${jobs[i]!.pid}\\b`));
  }
  t.true(alive(), 'all holders were running during the attempts');
});
