/**
 * Version bookkeeping through the real CLI (issue 5): tags, automatic b_daily/b_weekly/b_monthly tags,
 * protect/unprotect, expire and `ls --expired`, and the refusals of `rm` (protected, younger than
 * min_age_days, being restored) that must leave the repository exactly as it was.
 */
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { assertCliError, initRepo, makeImage, MiB, repoState, runCli, sha256File, type BlockSpec, type RepoFixture, type VersionJson } from './helpers.js';
import { killOnTeardown, pausePoints, spawnCli } from './cliHarness.js';
import { ls, ok, okJson, shmDir, writeConfig } from './lcHarness.js';

const BS = MiB;
const AUTO = ['b_daily', 'b_monthly', 'b_weekly'];

async function setup(t: ExecutionContext, blocks = 4) {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', encryption: 'none' });
  const img = await makeImage(path.join(dir, 'a.img'), { blockSize: BS, blocks: Array<BlockSpec>(blocks).fill('random'), seed: `lc-${t.title}` });
  return { dir, repo, img };
}

const backup = (repo: RepoFixture, source: string, name: string, extra: string[] = []) => okJson<VersionJson>(repo, ['backup', source, name, ...extra]);
const ids = (vs: VersionJson[]) => vs.map((v) => v.id).sort();
const autoTags = (v: VersionJson) => v.tags.filter((x) => x.startsWith('b_')).sort();
/** Local calendar day of an ISO date with offset (the CLI prints local time). */
const localDay = (iso: string) => iso.slice(0, 10);

/**
 * The repository seen by processes whose clock (BLOCKSAFE_TEST_CLOCK_OFFSET, which also dates new versions)
 * reads noon UTC of tomorrow, in UTC: a day that cannot end during the test, wherever and whenever it runs.
 */
function atNoon(repo: RepoFixture): { repo: RepoFixture; day: string } {
  const noon = new Date();
  noon.setUTCHours(36, 0, 0, 0);
  const env = { ...repo.env, TZ: 'UTC', BLOCKSAFE_TEST_CLOCK_OFFSET: String(noon.getTime() - Date.now()) };
  return { repo: { ...repo, env }, day: noon.toISOString().slice(0, 10) };
}

test('tag add / tag rm change the tags; ls --tag filters; a bad tag is a usage error that changes nothing', async (t) => {
  const { repo, img } = await setup(t);
  const v1 = await backup(repo, img.path, 'a', ['--tag', 'nightly']);
  const v2 = await backup(repo, img.path, 'a');
  t.true(v1.tags.includes('nightly'));
  t.false(v2.tags.includes('nightly'));

  const added = await okJson<VersionJson>(repo, ['tag add', v1.id, 'keep', 'audit-2026']);
  t.deepEqual(added.tags.filter((x) => !x.startsWith('b_')).sort(), ['audit-2026', 'keep', 'nightly']);
  await okJson(repo, ['tag add', v2.id, 'keep']);
  t.deepEqual(ids(await ls(repo, '--tag', 'keep')), [v1.id, v2.id].sort());

  const removed = await okJson<VersionJson>(repo, ['tag rm', v1.id, 'keep', 'nightly']);
  t.deepEqual(
    removed.tags.filter((x) => !x.startsWith('b_')),
    ['audit-2026'],
  );
  t.deepEqual(ids(await ls(repo, '--tag', 'keep')), [v2.id]);
  t.deepEqual(ids(await ls(repo, '--tag', 'nightly')), []);

  const before = await repoState(repo);
  const bad = await runCli(['tag', 'add', ...repo.args, v1.id, 'no spaces allowed'], { env: repo.env });
  assertCliError(t, bad, 2, /tag/i);
  t.deepEqual(await repoState(repo), before, 'a refused tag changes nothing');
  // the version is found by a unique prefix as well
  const byPrefix = await okJson<VersionJson>(repo, ['tag add', v2.id.slice(0, 5), 'prefix']);
  t.is(byPrefix.id, v2.id);
  t.true(byPrefix.tags.includes('prefix'));
});

test('automatic tags: the first version of a name in a day/week/month gets b_daily, b_weekly, b_monthly; later ones of that day none; per name; auto_tags = false turns them off', async (t) => {
  const { dir, repo: real, img } = await setup(t, 2);
  const { repo, day } = atNoon(real);
  const a1 = await backup(repo, img.path, 'a');
  const a2 = await backup(repo, img.path, 'a', ['--tag', 'manual']);
  const b1 = await backup(repo, img.path, 'b');
  t.is(localDay(a1.date), day, 'the versions are dated by the fake clock');
  t.is(localDay(a2.date), day);
  t.deepEqual(autoTags(a1), AUTO);
  t.deepEqual(autoTags(a2), [], 'the second version of the day gets no automatic tag');
  t.deepEqual(a2.tags, ['manual']);
  t.deepEqual(autoTags(b1), AUTO, 'automatic tags are per volume name');
  t.deepEqual(ids(await ls(repo, '--tag', 'b_daily')), [a1.id, b1.id].sort());

  const conf = await writeConfig(dir, 'noauto.conf', '[lifecycle]\nauto_tags = false');
  const c1 = await okJson<VersionJson>(repo, ['backup', img.path, 'c'], ['--config', conf]);
  t.deepEqual(c1.tags, [], 'auto_tags = false: no automatic tags');
});

test('protect refuses rm and rm --force (nothing changes) until unprotect', async (t) => {
  const { repo, img } = await setup(t);
  const v1 = await backup(repo, img.path, 'a');
  const v2 = await backup(repo, img.path, 'a');
  const p = await okJson<VersionJson>(repo, ['protect', v1.id]);
  t.true(p.protected);

  const before = await repoState(repo);
  const r = await runCli(['rm', ...repo.args, v1.id], { env: repo.env });
  assertCliError(t, r, 1, /protected/);
  t.deepEqual(await repoState(repo), before, 'a refused rm changes nothing');

  const u = await okJson<VersionJson>(repo, ['unprotect', v1.id]);
  t.false(u.protected);
  await ok(repo, ['rm', v1.id]);
  t.deepEqual(ids(await ls(repo)), [v2.id]);

  // --force overrides only the minimum age: a protected version stays until unprotect (backy2's promise).
  await okJson(repo, ['protect', v2.id]);
  const before2 = await repoState(repo);
  assertCliError(t, await runCli(['rm', ...repo.args, v2.id, '--force'], { env: repo.env }), 1, /protected; run "blocksafe unprotect/);
  t.deepEqual(await repoState(repo), before2, 'rm --force of a protected version changes nothing');
  await okJson(repo, ['unprotect', v2.id]);
  const forced = await okJson<{ removed: string[] }>(repo, ['rm', v2.id, '--force']);
  t.deepEqual(forced.removed, [v2.id]);
  t.deepEqual(await ls(repo), []);
});

test('expire sets and clears the expiry date; ls --expired lists exactly the versions whose date has passed', async (t) => {
  const { repo, img } = await setup(t);
  const v1 = await backup(repo, img.path, 'a');
  const v2 = await backup(repo, img.path, 'a');
  const v3 = await backup(repo, img.path, 'b');
  t.deepEqual(await ls(repo, '--expired'), []);

  const e1 = await okJson<VersionJson>(repo, ['expire', v1.id, '2001-02-03']);
  t.regex(e1.expire!, /^2001-02-03T00:00:00[+-]\d\d:\d\d$/, 'a date is local midnight, printed with the offset');
  const e2 = await okJson<VersionJson>(repo, ['expire', v2.id, '2999-12-31 23:30']);
  t.regex(e2.expire!, /^2999-12-31T23:30:00[+-]\d\d:\d\d$/);
  const past = new Date(Date.now() - 60_000).toISOString();
  await okJson(repo, ['expire', v3.id, past]);
  t.deepEqual(ids(await ls(repo, '--expired')), [v1.id, v3.id].sort(), 'past dates are expired, the future one is not');

  const cleared = await okJson<VersionJson>(repo, ['expire', v1.id, 'never']);
  t.is(cleared.expire, null);
  t.deepEqual(ids(await ls(repo, '--expired')), [v3.id]);

  const before = await repoState(repo);
  assertCliError(t, await runCli(['expire', ...repo.args, v2.id, 'next tuesday'], { env: repo.env }), 2, /date/i);
  const after = await repoState(repo);
  t.deepEqual(after, before, 'a bad date changes nothing');
  t.deepEqual((after.stats as { versions: { id: string }[] }).versions.map((v) => v.id).sort(), [v1.id, v2.id, v3.id].sort(), 'expiry alone removes nothing');
});

test('min_age_days = 7: rm refuses a young version (nothing changes) unless --force', async (t) => {
  const { dir, repo, img } = await setup(t);
  const conf = await writeConfig(dir, 'minage.conf', '[lifecycle]\nmin_age_days = 7');
  const v1 = await backup(repo, img.path, 'a');
  const v2 = await backup(repo, img.path, 'a');

  const before = await repoState(repo);
  const r = await runCli(['rm', ...repo.args, '--config', conf, v1.id], { env: repo.env });
  assertCliError(t, r, 1, /days/);
  t.deepEqual(await repoState(repo), before, 'a refused rm changes nothing');

  const forced = await okJson<{ removed: string[] }>(repo, ['rm', v1.id, '--force'], ['--config', conf]);
  t.deepEqual(forced.removed, [v1.id]);
  t.deepEqual(ids(await ls(repo)), [v2.id]);
});

test('rm of several versions where one is refused removes none of them', async (t) => {
  const { dir, repo, img } = await setup(t);
  const v1 = await backup(repo, img.path, 'a');
  const v2 = await backup(repo, img.path, 'a');
  const v3 = await backup(repo, img.path, 'b');
  await okJson(repo, ['protect', v3.id]);
  const before = await repoState(repo);

  // the refused one last, so that a one-by-one removal would already have removed the others
  assertCliError(t, await runCli(['rm', ...repo.args, v1.id, v2.id, v3.id], { env: repo.env }), 1, /protected/);
  t.deepEqual(await repoState(repo), before, 'protected among them: nothing removed');

  // an unknown id among them: nothing removed either
  assertCliError(t, await runCli(['rm', ...repo.args, v1.id, 'zzzzzzzz'], { env: repo.env }), 1);
  t.deepEqual(await repoState(repo), before, 'unknown id among them: nothing removed');

  // too young (all are, with a minimum age of 7 days)
  const conf = await writeConfig(dir, 'minage.conf', '[lifecycle]\nmin_age_days = 7');
  assertCliError(t, await runCli(['rm', ...repo.args, '--config', conf, v1.id, v2.id], { env: repo.env }), 1, /days/);
  t.deepEqual(await repoState(repo), before, 'too young: nothing removed');

  const ok2 = await okJson<{ removed: string[] }>(repo, ['rm', v1.id, v2.id]);
  t.deepEqual(ok2.removed.sort(), [v1.id, v2.id].sort());
  t.deepEqual(ids(await ls(repo)), [v3.id]);
});

test('a version being restored cannot be removed underneath the restore, and rm of it with another version removes neither', async (t) => {
  const dir = await shmDir(t);
  // 64 KiB blocks: the restore's first checkpoint (after 64 of 160 blocks) comes well before its end.
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '64K', encryption: 'none' });
  const img = await makeImage(path.join(dir, 'a.img'), { blockSize: 64 * 1024, blocks: Array<BlockSpec>(160).fill('random'), seed: 'lc-restore-lock' });
  const v1 = await backup(repo, img.path, 'a');
  const v2 = await backup(repo, img.path, 'b');
  const target = path.join(dir, 'restored.img');
  // The restore stops at its first checkpoint (a test pause point), alive and holding its locks, until
  // the rm attempts are done.
  const pause = await pausePoints(t);
  const restore = killOnTeardown(t, spawnCli(['restore', ...repo.args, v1.id, target, '--json'], { ...repo.env, ...pause.env('restore.checkpoint#1') }));
  t.true(await pause.reached('restore.checkpoint#1', restore), `precondition: the restore is under way: ${restore.stderr()}`);

  const before = await ls(repo);
  const r1 = await runCli(['rm', ...repo.args, v1.id], { env: repo.env });
  assertCliError(t, r1, 4, /lock/i);
  const r2 = await runCli(['rm', ...repo.args, v2.id, v1.id], { env: repo.env });
  t.is(r2.code, 4, `rm of a free and a busy version is refused (stderr: ${r2.stderr.trim()})`);
  t.deepEqual(ids(await ls(repo)), ids(before), 'neither version was removed');

  t.false(restore.exited(), 'the restore was running during both attempts');
  await pause.go('restore.checkpoint#1');
  const done = await restore.done;
  t.is(done.code, 0, done.stderr);
  t.is(await sha256File(target), img.sha256, 'the restore finished byte-identical');
  await ok(repo, ['rm', v1.id]);
});
