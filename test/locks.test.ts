/**
 * Locks and concurrency through the real CLI: independent operations on one repository run at the same
 * time; a real conflict fails fast with exit code 4 naming the holder (pid and command); a lock left by a
 * process killed with SIGKILL is detected as stale and taken over. Lock holders stop at a test pause point
 * (their first commit or checkpoint, locks held) for as long as the test needs them: no throttling, no
 * race with the machine's speed.
 */
import * as path from 'node:path';
import test from 'ava';
import { assertCliError, initRepo, MiB, runCli, runJson, sha256File, type RepoFixture } from './helpers.js';
import { fastTempDir, killOnTeardown, type Background, type FullVersion, lsJson, pausePoints, randomFile, spawnCli } from './cliHarness.js';

type V = FullVersion;

/** 64 KiB blocks and 8 MiB images: 128 blocks, so a first commit (backup) or checkpoint (restore, every 64 blocks) comes before the end. */
const IMAGE = 8 * MiB;

async function setup(t: Parameters<typeof fastTempDir>[0]): Promise<{ dir: string; repo: RepoFixture }> {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '64K' });
  return { dir, repo };
}

/** The step at which a backup (`writer.commit#1`) or a restore (`restore.checkpoint#1`) holds its locks and waits. */
const STEP = { backup: 'writer.commit#1', restore: 'restore.checkpoint#1' } as const;

/**
 * Starts `blocksafe <args>` stopped at `step` (its own pause directory, so that several can wait at the same
 * step); resolves once it is there, with `go` to let it finish.
 */
async function startHeld(t: Parameters<typeof fastTempDir>[0], step: string, args: string[], env: Record<string, string>): Promise<Background & { go: () => Promise<void> }> {
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(args, { ...env, ...pause.env(step) }));
  if (!(await pause.reached(step, bg))) throw new Error(`blocksafe ${args.join(' ')} ended before ${step}: ${bg.stderr()}`);
  return { ...bg, go: () => pause.go(step) };
}

test('two backups of different names and a restore of a third version run at the same time and all succeed', async (t) => {
  const { dir, repo } = await setup(t);
  const [a, b, c] = ['a', 'b', 'c'].map((n) => path.join(dir, `${n}.img`)) as [string, string, string];
  await Promise.all([randomFile(a, IMAGE, 'lock-a'), randomFile(b, IMAGE, 'lock-b'), randomFile(c, IMAGE, 'lock-c')]);
  const vc = await runJson<V>(['backup', ...repo.args, c, 'vol-c'], { env: repo.env });
  const target = path.join(dir, 'c.restored');

  // All three are in the middle of their work (locks held) at one moment: each waits at a pause point
  // until the other two have got that far.
  const ba = await startHeld(t, STEP.backup, ['backup', ...repo.args, a, 'vol-a', '--json'], repo.env);
  const bb = await startHeld(t, STEP.backup, ['backup', ...repo.args, b, 'vol-b', '--json'], repo.env);
  const rc = await startHeld(t, STEP.restore, ['restore', ...repo.args, vc.id, target, '--json'], repo.env);
  const vs = await lsJson(repo);
  t.true(
    ['vol-a', 'vol-b'].every((n) => vs.some((v) => v.name === n && !v.complete)),
    'both backups are under way',
  );
  t.false(ba.exited() || bb.exited() || rc.exited());
  await Promise.all([ba.go(), bb.go(), rc.go()]);

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
  const { dir, repo } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, IMAGE, 'lock-same');
  const first = await startHeld(t, STEP.backup, ['backup', ...repo.args, img, 'disk'], repo.env);
  const running = (await lsJson(repo, 'disk')).find((v) => !v.complete);
  if (!running) return t.fail('the held backup has no incomplete version');

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
  const { dir, repo } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, IMAGE, 'lock-rm');
  const v = await runJson<V>(['backup', ...repo.args, img, 'disk'], { env: repo.env });
  const target = path.join(dir, 't.img');
  const restore = await startHeld(t, STEP.restore, ['restore', ...repo.args, v.id, target], repo.env);

  const rm = await runCli(['rm', ...repo.args, v.id], { env: repo.env });
  const msg = assertCliError(t, rm, 4, new RegExp(`pid ${restore.pid}\\b`));
  t.regex(msg, /"blocksafe .*restore /, "names the holder's command");
  t.true(msg.includes(v.id));

  const other = await runCli(['restore', ...repo.args, v.id, path.join(dir, 'elsewhere.img'), '--json'], { env: repo.env });
  t.is(other.code, 0, `a restore of the same version to another target runs alongside: ${other.stderr}`);
  t.false(restore.exited(), 'the conflict was detected while the restore was running');
  t.deepEqual(
    (await lsJson(repo)).map((x) => x.id),
    [v.id],
    'the version survived the refused rm',
  );
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
  const { dir, repo } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, IMAGE, 'lock-len-b');
  const names = ['n', 'v'.repeat(58 - 'volume:'.length)];
  const jobs: Background[] = [];
  for (const n of names) jobs.push(await startHeld(t, STEP.backup, ['backup', ...repo.args, img, n], repo.env));
  const alive = () => jobs.every((j) => !j.exited());
  for (const [i, n] of names.entries()) {
    const r = await runCli(['backup', ...repo.args, img, n], { env: repo.env });
    t.is(r.code, 4, `a second backup of "${n}" (${n.length} characters) is refused: ${r.stderr}${r.stdout}`);
    t.regex(r.stderr, new RegExp(`pid ${jobs[i]!.pid}\\b`));
  }
  t.true(alive(), 'all holders were running during the attempts');
});

test('a second restore to a target being restored is refused whatever the length of its path', async (t) => {
  const { dir, repo } = await setup(t);
  const img = path.join(dir, 'disk.img');
  await randomFile(img, IMAGE, 'lock-len-r');
  const v = await runJson<V>(['backup', ...repo.args, img, 'seed'], { env: repo.env });
  const targets = [path.join(dir, 't'), path.join(dir, 't'.repeat(Math.max(1, 58 - 'target:'.length - dir.length - 1)))];
  const jobs: Background[] = [];
  for (const p of targets) jobs.push(await startHeld(t, STEP.restore, ['restore', ...repo.args, v.id, p], repo.env));
  const alive = () => jobs.every((j) => !j.exited());
  for (const [i, p] of targets.entries()) {
    const r = await runCli(['restore', ...repo.args, v.id, p, '--force'], { env: repo.env });
    t.is(r.code, 4, `a second restore to ${p} (${p.length} characters) is refused: ${r.stderr}`);
    t.regex(r.stderr, new RegExp(`pid ${jobs[i]!.pid}\\b`));
  }
  t.true(alive(), 'all holders were running during the attempts');
});
