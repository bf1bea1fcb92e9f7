/**
 * Issue 13: no concurrent command, lost index or interrupted run may lose data silently. Each test
 * reproduces one of the reported ways the first release lost data (real CLI processes, real files), and
 * interleaves processes with test pause points (src/util/pause.ts), never with sleeps.
 */
import { createHmac } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { have, killOnTeardown, pausePoints, spawnCli, waitFor } from './cliHarness.js';
import {
  assertCliError,
  differingBlocks,
  initKeyFileRepo,
  initRepo,
  makeImage,
  run,
  runCli,
  runJson,
  runOk,
  sha256File,
  type BlockSpec,
  type Image,
  type RepoFixture,
  type VersionJson,
} from './helpers.js';
import { overwriteAt, shmDir, type CheckJson, type CleanupJson, type RestoreJson, type ScrubJson } from './lcHarness.js';

const BS = 64 * 1024;

async function mixedImage(dir: string, name: string, blocks: number, seed: string): Promise<Image> {
  const kinds: BlockSpec[] = ['random', 'text', 'random', 'zero', 'random', 'text'];
  return makeImage(path.join(dir, name), { blockSize: BS, blocks: Array.from({ length: blocks }, (_, i) => kinds[i % kinds.length]!), seed });
}

async function restoredSha(repo: RepoFixture, dir: string, id: string): Promise<string> {
  const out = path.join(dir, `restored-${id}-${Math.random().toString(36).slice(2)}.img`);
  await runOk(['restore', ...repo.args, id, out], { env: repo.env });
  const sha = await sha256File(out);
  await fs.rm(out);
  return sha;
}

async function scrubClean(t: ExecutionContext, repo: RepoFixture): Promise<void> {
  const r = await runCli(['scrub', ...repo.args, '--all', '--json'], { env: repo.env });
  t.is(r.code, 0, `scrub --all is clean: ${r.stderr}${r.stdout}`);
  t.deepEqual((JSON.parse(r.stdout) as ScrubJson).damaged, []);
  const check = await runJson<CheckJson>(['check', ...repo.args], { env: repo.env });
  t.deepEqual(check.missing_objects, [], 'no referenced object is missing');
}

/** The object file of a block in an unencrypted repository (its MAC key is in the plain keyring). */
async function objectOf(repoDir: string, data: Buffer): Promise<string> {
  const keyring = JSON.parse(await fs.readFile(path.join(repoDir, 'keys', 'keyring'), 'utf8')) as { mac_key: string };
  const hex = createHmac('sha256', Buffer.from(keyring.mac_key, 'base64')).update(data).digest('hex');
  return path.join(repoDir, 'data', hex.slice(0, 2), hex);
}

const incomplete = async (repo: RepoFixture) => (await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env })).find((v) => !v.complete)!;

test('a version being written cannot be removed: rm --force is refused with exit 4 naming the backup, which completes and restores byte-identical', async (t) => {
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const img = await mixedImage(dir, 'a.img', 256, 'own');
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['backup', ...repo.args, img.path, 'vol', '--json'], { ...repo.env, ...pause.env('writer.commit#2') }));
  t.true(await pause.reached('writer.commit#2', bg), bg.stderr());
  const v = await incomplete(repo);
  t.truthy(v, 'the running backup is listed as incomplete');
  assertCliError(t, await runCli(['rm', ...repo.args, '--force', v.id], { env: repo.env }), 4, new RegExp(`Version ${v.id} is locked by pid ${bg.pid} .*"blocksafe backup`));
  await pause.go('writer.commit#2');
  const done = await bg.done;
  t.is(done.code, 0, done.stderr);
  const written = JSON.parse(done.stdout) as VersionJson;
  t.is(written.id, v.id);
  t.true(written.complete && written.valid);
  t.is(await restoredSha(repo, dir, v.id), img.sha256);
  await scrubClean(t, repo);
});

test("cleanup after the index was lost, or replaced by an old copy, deletes nothing the store's manifests reference", async (t) => {
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const a = await mixedImage(dir, 'a.img', 48, 'lostA');
  const b = await mixedImage(dir, 'b.img', 48, 'lostB');
  const v1 = await runJson<VersionJson>(['backup', ...repo.args, a.path, 'a']);
  const oldIndex = path.join(dir, 'index-copy');
  await fs.cp(path.join(repo.dir, 'index'), oldIndex, { recursive: true });
  const v2 = await runJson<VersionJson>(['backup', ...repo.args, b.path, 'b']);
  const objectsBefore = (await fs.readdir(path.join(repo.dir, 'data'), { recursive: true })).length;

  // 1. The index is gone (a new machine, a damaged disk).
  await fs.rm(path.join(repo.dir, 'index'), { recursive: true });
  for (let i = 0; i < 2; i++) t.is((await runJson<CleanupJson>(['cleanup', ...repo.args, '--grace', '0'])).deleted, 0);
  // 2. The index is an old copy that does not know v2.
  await fs.rm(path.join(repo.dir, 'index'), { recursive: true });
  await fs.cp(oldIndex, path.join(repo.dir, 'index'), { recursive: true });
  for (let i = 0; i < 2; i++) t.is((await runJson<CleanupJson>(['cleanup', ...repo.args, '--grace', '0'])).deleted, 0);

  t.is((await fs.readdir(path.join(repo.dir, 'data'), { recursive: true })).length, objectsBefore);
  t.is(await restoredSha(repo, dir, v1.id), a.sha256);
  t.is(await restoredSha(repo, dir, v2.id), b.sha256);
  await scrubClean(t, repo);
});

test('restore --resume keeps the damage found before the interruption: exit 3, the damaged range reported, nothing else differs', async (t) => {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '64K', encryption: 'none' });
  const img = await makeImage(path.join(dir, 'a.img'), { blockSize: BS, blocks: Array<BlockSpec>(160).fill('random'), seed: 'damage' });
  const v = await runJson<VersionJson>(['backup', ...repo.args, img.path, 'vol']);
  // Damage block 3 (its object), which the restore passes long before its first checkpoint at block 64.
  const block3 = (await fs.readFile(img.path)).subarray(3 * BS, 4 * BS);
  await overwriteAt(await objectOf(repo.dir, block3), 40, Buffer.from('rot'));

  const target = path.join(dir, 'target.img');
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['restore', ...repo.args, v.id, target, '--json'], pause.env('restore.checkpoint#1')));
  t.true(await pause.reached('restore.checkpoint#1', bg), bg.stderr());
  await bg.kill9();

  const resumed = await runCli(['restore', ...repo.args, '--resume', v.id, target, '--json']);
  t.is(resumed.code, 3, `a restore with damage exits 3: ${resumed.stderr}`);
  const r = JSON.parse(resumed.stdout) as RestoreJson;
  t.deepEqual(
    r.damaged.map((d) => [d.offset, d.length]),
    [[3 * BS, BS]],
  );
  t.deepEqual(await differingBlocks(target, img), [3], 'only the damaged block differs');
});

test('rekey while a restore runs: the restore reads the re-encrypted blocks (exit 0, byte-identical); the old key is retired only afterwards', async (t) => {
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const img = await makeImage(path.join(dir, 'a.img'), { blockSize: BS, blocks: Array<BlockSpec>(200).fill('random'), seed: 'rekey' });
  const v = await runJson<VersionJson>(['backup', ...repo.args, img.path, 'vol']);
  const target = path.join(dir, 'target.img');
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['restore', ...repo.args, v.id, target, '--json'], pause.env('restore.checkpoint#1')));
  t.true(await pause.reached('restore.checkpoint#1', bg), bg.stderr());

  // Every block is re-encrypted under key 2 while the restore holds a keyring that knows only key 1.
  const rekey = await runJson<{ key_id: number; blocks_rewritten: number; retired_keys: number[]; kept_because: string | null }>(['rekey', ...repo.args]);
  t.is(rekey.key_id, 2);
  t.is(rekey.blocks_rewritten, 200);
  t.deepEqual(rekey.retired_keys, [], 'key 1 is not retired while the restore may still use it');
  t.regex(rekey.kept_because ?? '', /other processes use the repository .*restore/);

  await pause.go('restore.checkpoint#1');
  const done = await bg.done;
  t.is(done.code, 0, `the restore read the re-encrypted blocks: ${done.stderr}`);
  t.deepEqual((JSON.parse(done.stdout) as RestoreJson).damaged, []);
  t.is(await sha256File(target), img.sha256);
  t.deepEqual((await runJson<{ retired_keys: number[] }>(['rekey', ...repo.args])).retired_keys, [1], 'retired once nothing uses it');
  await scrubClean(t, repo);
});

test('a scrub that read blocks before a cleanup deleted them does not bring their records back; the next backup stores them anew', async (t) => {
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const img = await mixedImage(dir, 'a.img', 60, 'cas');
  const v1 = await runJson<VersionJson>(['backup', ...repo.args, img.path, 'vol']);
  const pause = await pausePoints(t);
  const scrub = killOnTeardown(t, spawnCli(['scrub', ...repo.args, '--all', '--json'], { ...repo.env, ...pause.env('scrub.update') }));
  t.true(await pause.reached('scrub.update', scrub), scrub.stderr());
  await runOk(['rm', ...repo.args, v1.id]);
  const gc = await runJson<CleanupJson>(['cleanup', ...repo.args, '--grace', '0']);
  t.true(gc.deleted > 0, 'precondition: the cleanup deleted the blocks the scrub had read');
  await pause.go('scrub.update');
  t.is((await scrub.done).code, 0);

  const check = await runJson<CheckJson & { blocks_in_index: number }>(['check', ...repo.args]);
  t.is(check.blocks_in_index, 0, 'no block record came back');
  t.deepEqual(check.missing_objects, []);
  const v2 = await runJson<VersionJson>(['backup', ...repo.args, img.path, 'vol']);
  t.is(v2.stats.blocks_deduplicated, 0, 'nothing deduplicated against a deleted block');
  t.is(await restoredSha(repo, dir, v2.id), img.sha256);
  await scrubClean(t, repo);
});

test('rm of an interrupted first backup works and leaves a clean repository', async (t) => {
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const img = await mixedImage(dir, 'a.img', 200, 'first');
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['backup', ...repo.args, img.path, 'vol'], pause.env('writer.commit#1')));
  t.true(await pause.reached('writer.commit#1', bg), bg.stderr());
  await bg.kill9();
  const v = await incomplete(repo);
  const r = await runCli(['rm', ...repo.args, v.id]);
  t.is(r.code, 0, r.stderr);
  t.is(r.stderr, '');
  t.deepEqual(await runJson(['ls', ...repo.args]), []);
  t.is((await runJson<CleanupJson>(['cleanup', ...repo.args, '--grace', '0'])).waiting, 0);
  t.deepEqual((await runJson<CheckJson & { objects_in_store: number }>(['check', ...repo.args])).objects_in_store, 0);
});

test('backup, rm, prune, cleanup, scrub and rekey at once: each succeeds or is refused with exit 4, and every complete version restores byte-identical', async (t) => {
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const a = await mixedImage(dir, 'a.img', 128, 'concA');
  const b = await mixedImage(dir, 'b.img', 128, 'concB');
  const a2 = path.join(dir, 'a2.img');
  await fs.copyFile(a.path, a2);
  for (const i of [5, 50, 100]) await overwriteAt(a2, i * BS, Buffer.alloc(BS, i));
  const source = new Map<string, string>();
  for (const [img, name] of [
    [a.path, 'a'],
    [b.path, 'b'],
    [a.path, 'a'],
  ] as const)
    source.set((await runJson<VersionJson>(['backup', ...repo.args, img, name])).id, img);
  const [oldA] = [...source.keys()];

  // Two backups stop at their first commit; everything else runs while they hold their versions.
  const pause = await pausePoints(t);
  const backups = [
    { img: a2, bg: killOnTeardown(t, spawnCli(['backup', ...repo.args, a2, 'a', '--json'], pause.env('writer.commit#1'))) },
    { img: b.path, bg: killOnTeardown(t, spawnCli(['backup', ...repo.args, b.path, 'b', '--json'], pause.env('writer.commit#1'))) },
  ];
  for (const { bg } of backups) t.true(await pause.reached('writer.commit#1', bg), bg.stderr());
  const later = { BLOCKSAFE_TEST_CLOCK_OFFSET: String(3 * 3600_000) };
  const others = await Promise.all([
    runCli(['rm', ...repo.args, oldA!]),
    runCli(['prune', ...repo.args, '--keep-last', '1', '--json']),
    runCli(['cleanup', ...repo.args, '--grace', '1h', '--json'], { env: later }),
    runCli(['scrub', ...repo.args, '--all', '--json']),
    runCli(['rekey', ...repo.args, '--json']),
  ]);
  for (const r of others) t.true(r.code === 0 || r.code === 4, `exit ${r.code}: ${r.stderr}`);
  await pause.go('writer.commit#1');
  for (const { img, bg } of backups) {
    const r = await bg.done;
    t.is(r.code, 0, r.stderr);
    source.set((JSON.parse(r.stdout) as VersionJson).id, img);
  }
  await runJson(['cleanup', ...repo.args, '--grace', '1h'], { env: later });
  const left = await runJson<VersionJson[]>(['ls', ...repo.args]);
  t.true(left.length >= 2, `versions left: ${left.map((v) => v.id).join(', ')}`);
  for (const v of left) {
    t.true(v.complete && v.valid, `${v.id} complete and valid`);
    t.is(await restoredSha(repo, dir, v.id), await sha256File(source.get(v.id)!), `${v.id} restores byte-identical`);
  }
  await scrubClean(t, repo);
});

test('rekey while a scrub runs: the scrub reads the re-encrypted blocks and finds nothing damaged; no block is marked invalid', async (t) => {
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const img = await mixedImage(dir, 'a.img', 120, 'rekey-scrub');
  const v = await runJson<VersionJson>(['backup', ...repo.args, img.path, 'vol']);
  const pause = await pausePoints(t);
  // The scrub has loaded the keyring (key 1 only) and selected its blocks; it has read none yet.
  const scrub = killOnTeardown(t, spawnCli(['scrub', ...repo.args, '--all', '--json'], pause.env('scrub.started')));
  t.true(await pause.reached('scrub.started', scrub), scrub.stderr());
  const rekey = await runJson<{ key_id: number; blocks_rewritten: number; retired_keys: number[] }>(['rekey', ...repo.args]);
  t.is(rekey.key_id, 2);
  t.true(rekey.blocks_rewritten > 0);
  t.deepEqual(rekey.retired_keys, [], 'key 1 stays while the scrub may use it');
  await pause.go('scrub.started');
  const done = await scrub.done;
  t.is(done.code, 0, `the scrub read objects of a key it did not know at its start: ${done.stderr}`);
  t.deepEqual((JSON.parse(done.stdout) as ScrubJson).damaged, []);
  const shown = await runJson<VersionJson>(['show', ...repo.args, v.id]);
  t.true(shown.valid, 'the version is still valid');
  t.deepEqual((await runJson<{ retired_keys: number[] }>(['rekey', ...repo.args])).retired_keys, [1]);
  t.is(await restoredSha(repo, dir, v.id), img.sha256);
  await scrubClean(t, repo);
});

test('rekey while an NBD export with --rw --keep-as runs: reads after the rekey are intact and the overlay is kept as a version', async (t) => {
  for (const tool of ['qemu-io']) if (!have(tool)) return t.fail(`${tool} is needed (Debian package qemu-utils)`);
  const dir = await shmDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '64K' });
  const img = await mixedImage(dir, 'a.img', 64, 'rekey-nbd');
  await runJson<VersionJson>(['backup', ...repo.args, img.path, 'vol']);
  const srv = killOnTeardown(t, spawnCli(['nbd', ...repo.args, '--json', '--rw', '--keep-as', 'vol-edited', 'vol']));
  const listening = await waitFor('the NBD server to listen', () => {
    if (srv.exited()) throw new Error(`nbd exited: ${srv.stderr()}`);
    const line = srv.stdout().split('\n')[0];
    return srv.stdout().includes('\n') ? (JSON.parse(line!) as { exports: { name: string; uri: string }[] }) : undefined;
  });
  const uri = listening.exports.find((e) => e.name.endsWith('vol'))!.uri;
  // A write before the rekey lands in the overlay; the rekey then rewrites every block under key 2.
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${3 * BS} ${BS}`, uri]);
  const rekey = await runJson<{ key_id: number; retired_keys: number[] }>(['rekey', ...repo.args]);
  t.is(rekey.key_id, 2);
  t.deepEqual(rekey.retired_keys, [], 'key 1 stays while the export may use it');
  // Unwritten blocks are now read from objects of key 2; the written one still from the overlay.
  const original = await fs.readFile(img.path);
  const copy = path.join(dir, 'via-nbd.img');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, copy]);
  const expected = Buffer.from(original);
  expected.fill(0x5a, 3 * BS, 4 * BS);
  t.true((await fs.readFile(copy)).equals(expected), 'the export reads the re-encrypted blocks and the overlay');
  srv.child.kill('SIGINT');
  const stopped = await srv.done;
  t.is(stopped.code, 0, stopped.stderr);
  const kept = stopped.stdout
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as { event: string; version?: VersionJson })
    .find((e) => e.event === 'kept')?.version;
  if (!kept) return t.fail(`no kept version: ${stopped.stdout} ${stopped.stderr}`);
  const restored = path.join(dir, 'kept.img');
  await runOk(['restore', ...repo.args, kept.id, restored]);
  t.true((await fs.readFile(restored)).equals(expected), 'the kept version holds the write');
  await scrubClean(t, repo);
});
