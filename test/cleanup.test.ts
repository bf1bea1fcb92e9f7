/**
 * Garbage collection through the real CLI (issue 5): rm + cleanup frees exactly the space no other version
 * uses (measured on disk and compared with `du`), the remaining versions restore byte-identical, a grace
 * period defers deletion, and a cleanup running while a backup deduplicates against the blocks of a
 * just-removed version loses nothing.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { initRepo, makeImage, MiB, prngBytes, runCli, sha256File, type BlockSpec, type Image, type RepoFixture, type VersionJson } from './helpers.js';
import { cliJson, dataBytes, objects, okJson, overwriteAt, shmDir, type CheckJson, type CleanupJson, type DuJson, type RestoreJson, type ScrubJson } from './lcHarness.js';
import { killOnTeardown, pausePoints, spawnCli as spawnCliAt } from './cliHarness.js';

const BS = MiB;

const backup = (repo: RepoFixture, source: string, name: string, extra: string[] = []) => okJson<VersionJson>(repo, ['backup', source, name, ...extra]);

async function restoresIdentical(t: ExecutionContext, repo: RepoFixture, dir: string, v: VersionJson, image: Image | string): Promise<void> {
  const target = path.join(dir, `restore-${v.id}.img`);
  const r = await cliJson<RestoreJson>(repo, ['restore', v.id, target]);
  t.is(r.code, 0, `restore of ${v.id}: ${r.stderr}`);
  t.deepEqual(r.json.damaged, []);
  const want = typeof image === 'string' ? await sha256File(image) : image.sha256;
  t.is(await sha256File(target), want, `${v.id} restores byte-identical`);
}

/** A cleanup run `laterMs` in the future (the test clock of src/util/clock.ts), instead of waiting. */
async function cleanupLater(repo: RepoFixture, grace: string, laterMs: number): Promise<CleanupJson> {
  const r = await runCli(['cleanup', ...repo.args, '--grace', grace, '--json'], { env: { ...repo.env, BLOCKSAFE_TEST_CLOCK_OFFSET: String(laterMs) } });
  if (r.code !== 0) throw new Error(`cleanup exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as CleanupJson;
}

async function sizes(repoDir: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const [hex, p] of await objects(repoDir)) out.set(hex, (await fs.stat(p)).size);
  return out;
}

test('rm + cleanup --grace 0 frees exactly the space du called exclusive; the other versions restore byte-identical', async (t) => {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', encryption: 'none' });
  const layout: BlockSpec[] = ['random', 'text', 'random', 'zero', 'text', 'random', 'text', 'random', 'random', 'text'];
  const A = await makeImage(path.join(dir, 'a.img'), { blockSize: BS, blocks: layout, seed: 'gcA', tail: { bytes: 77_777, kind: 'text' } });
  const v1 = await backup(repo, A.path, 'a');
  // B: A with blocks 2, 4, 6 and 8 changed (the rest shared with v1)
  const B = path.join(dir, 'b.img');
  await fs.copyFile(A.path, B);
  for (const i of [2, 4, 6, 8]) await overwriteAt(B, i * BS, prngBytes('gcB', `b${i}`, BS));
  const v2 = await backup(repo, B, 'a');
  // C, another volume: new data plus block 8 of A (so that one block of v1 is shared with another name)
  const C = await makeImage(path.join(dir, 'c.img'), { blockSize: BS, blocks: ['random', 'text', 'random'], seed: 'gcC' });
  await fs.appendFile(C.path, (await fs.readFile(A.path)).subarray(8 * BS, 9 * BS));
  const v3 = await backup(repo, C.path, 'c');

  const du = await okJson<DuJson>(repo, ['du']);
  const u1 = du.versions.find((v) => v.id === v1.id)!;
  t.is(u1.referenced_bytes, u1.exclusive_bytes + u1.shared_bytes);
  t.is(du.unreferenced_bytes, 0);
  const before = await sizes(repo.dir);
  t.is(
    du.stored_bytes,
    [...before.values()].reduce((a, b) => a + b, 0),
    'du stored_bytes = the size of data/',
  );
  t.true(u1.exclusive_bytes > 0 && u1.shared_bytes > 0, 'precondition: v1 has both exclusive and shared blocks');

  const rm = await okJson<{ removed: string[] }>(repo, ['rm', v1.id]);
  t.deepEqual(rm.removed, [v1.id]);
  t.deepEqual(await sizes(repo.dir), before, 'rm alone deletes no block');
  const duRm = await okJson<DuJson>(repo, ['du']);
  t.is(duRm.unreferenced_bytes, u1.exclusive_bytes, "after rm, v1's exclusive blocks are unreferenced");
  const stats = await okJson<{ versions: { id: string }[] }>(repo, ['stats']);
  t.deepEqual(stats.versions.map((v) => v.id).sort(), [v2.id, v3.id].sort(), 'the removed version is gone from the stats listing');

  const c = await okJson<CleanupJson>(repo, ['cleanup', '--grace', '0']);
  const after = await sizes(repo.dir);
  const deleted = [...before.keys()].filter((h) => !after.has(h));
  t.is(deleted.length, 3, 'the objects of blocks 2, 4 and 6 of v1 (block 8 is still used by volume c)');
  t.is(c.deleted, deleted.length);
  t.is(c.bytes_freed, u1.exclusive_bytes, 'cleanup reports the exclusive bytes as freed');
  const beforeTotal = [...before.values()].reduce((a, b) => a + b, 0);
  t.is(beforeTotal - (await dataBytes(repo.dir)), u1.exclusive_bytes, 'data/ shrank by exactly the exclusive bytes');
  t.is(
    deleted.reduce((n, h) => n + before.get(h)!, 0),
    u1.exclusive_bytes,
  );
  for (const h of after.keys()) t.is(after.get(h), before.get(h), 'no remaining object changed');

  const duAfter = await okJson<DuJson>(repo, ['du']);
  t.is(duAfter.unreferenced_bytes, 0);
  t.is(duAfter.stored_bytes, beforeTotal - u1.exclusive_bytes);
  const check = await okJson<CheckJson>(repo, ['check']);
  t.deepEqual(check.missing_objects, []);
  t.deepEqual(check.unknown_objects, []);

  const again = await okJson<CleanupJson>(repo, ['cleanup', '--grace', '0']);
  t.is(again.deleted, 0, 'a second cleanup has nothing to do');
  t.is(again.bytes_freed, 0);

  await restoresIdentical(t, repo, dir, v2, B);
  await restoresIdentical(t, repo, dir, v3, C.path);
});

test('with a grace period the first cleanup only marks; deletion happens once the grace period is over, and a block used again meanwhile survives', async (t) => {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', encryption: 'none' });
  const A = await makeImage(path.join(dir, 'a.img'), { blockSize: BS, blocks: ['random', 'random', 'text', 'random', 'random', 'text'], seed: 'grace' });
  const keep = await makeImage(path.join(dir, 'k.img'), { blockSize: BS, blocks: ['random', 'random'], seed: 'keep' });
  const v1 = await backup(repo, A.path, 'a');
  await backup(repo, keep.path, 'k');
  // the part of A that a later backup uses again
  const again = path.join(dir, 'again.img');
  await fs.writeFile(again, (await fs.readFile(A.path)).subarray(0, 2 * BS));
  const total = await dataBytes(repo.dir);
  const exclusive = (await okJson<DuJson>(repo, ['du'])).versions.find((v) => v.id === v1.id)!.exclusive_bytes;

  await okJson(repo, ['rm', v1.id]);
  const before = await sizes(repo.dir);
  const first = await okJson<CleanupJson>(repo, ['cleanup', '--grace', '2h']);
  t.is(first.grace_ms, 2 * 3600_000);
  t.is(first.marked, 6, 'the 6 blocks of v1 are marked');
  t.is(first.deleted, 0, 'nothing is deleted inside the grace period');
  t.is(first.bytes_freed, 0);
  t.is(first.waiting, 6);
  t.is(await dataBytes(repo.dir), total);

  // a backup takes 2 of the marked blocks into use again before the grace period ends
  const v3 = await backup(repo, again, 'again');
  t.is(v3.stats.blocks_written, 0, 'precondition: deduplicated against the marked blocks');
  const early = await okJson<CleanupJson>(repo, ['cleanup', '--grace', '2h']);
  t.is(early.deleted, 0, 'still inside the grace period');
  t.is(early.waiting, 4, 'the reused blocks are no longer candidates');
  t.is(await dataBytes(repo.dir), total);

  // Three hours later (a fake clock: BLOCKSAFE_TEST_CLOCK_OFFSET), the grace period is over.
  const late = await cleanupLater(repo, '2h', 3 * 3600_000);
  const after = await sizes(repo.dir);
  const deleted = [...before.keys()].filter((h) => !after.has(h));
  t.is(deleted.length, 4, 'the 4 blocks nobody uses again are deleted after the grace period');
  t.is(early.deleted + late.deleted, 4);
  t.is(late.waiting, 0);
  t.is(
    early.bytes_freed + late.bytes_freed,
    deleted.reduce((n, h) => n + before.get(h)!, 0),
    'bytes_freed = the size of the deleted objects',
  );
  t.is(await dataBytes(repo.dir), total - early.bytes_freed - late.bytes_freed);
  t.true(early.bytes_freed + late.bytes_freed < exclusive, 'less than all of v1: 2 of its blocks are in use again');
  await restoresIdentical(t, repo, dir, v3, again);
  const s = await cliJson<ScrubJson>(repo, ['scrub', '--all']);
  t.is(s.code, 0);
  t.deepEqual(s.json.damaged, []);
});

async function nothingLost(t: ExecutionContext, repo: RepoFixture, dir: string, v2: VersionJson, image: string, blocks: number): Promise<void> {
  const all = await cliJson<ScrubJson>(repo, ['scrub', '--all']);
  t.is(all.code, 0, 'scrub --all is clean');
  t.deepEqual(all.json.damaged, []);
  const one = await cliJson<ScrubJson>(repo, ['scrub', v2.id]);
  t.is(one.code, 0, 'scrub of the new version is clean');
  t.deepEqual(one.json.damaged, []);
  t.is(one.json.blocks_selected, blocks);
  t.is(all.json.blocks_selected, blocks, 'the index knows every block the version uses');
  const check = await cliJson<CheckJson>(repo, ['check']);
  t.deepEqual(check.json.missing_objects, []);
  t.true((await okJson<VersionJson[]>(repo, ['ls'])).every((v) => v.valid && v.complete));
  await restoresIdentical(t, repo, dir, v2, image);
}

test('a cleanup while a backup deduplicates against a just-removed version deletes only what the backup has not reached, and loses nothing', async (t) => {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '64K', encryption: 'none' });
  const BLOCKS = 256;
  const A = await makeImage(path.join(dir, 'a.img'), { blockSize: 64 * 1024, blocks: Array<BlockSpec>(BLOCKS).fill('random'), seed: 'race' });
  const v1 = await backup(repo, A.path, 'a');
  await okJson(repo, ['rm', v1.id]);
  // Every block of v1 is a candidate before the backup starts: it must take them off the list as it goes.
  const first = await okJson<CleanupJson>(repo, ['cleanup', '--grace', '1h']);
  t.is(first.marked, BLOCKS);
  t.is(first.deleted, 0);

  // The backup of the same data stops after its second commit (128 of 256 blocks recorded).
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCliAt(['backup', ...repo.args, A.path, 'a', '--json'], { ...repo.env, ...pause.env('writer.commit#2') }));
  t.true(await pause.reached('writer.commit#2', bg), `the backup reached its second commit: ${bg.stderr()}`);

  // A short grace period is refused outright while anything writes: nothing is deleted.
  const files = await sizes(repo.dir);
  const refused = await runCli(['cleanup', ...repo.args, '--grace', '0'], { env: repo.env });
  t.is(refused.code, 4, refused.stderr);
  t.regex(refused.stderr, /only allowed while nothing writes .* is writing/);
  t.deepEqual(await sizes(repo.dir), files);

  // Two hours later (fake clock) the candidates are due: those the backup has not reached are deleted,
  // those it already relies on are not.
  const sweep = await cleanupLater(repo, '1h', 2 * 3600_000);
  t.true(sweep.deleted > 0 && sweep.deleted < BLOCKS, `precondition: a part of the removed version was deleted (${sweep.deleted})`);
  await pause.go('writer.commit#2');
  const done = await bg.done;
  t.is(done.code, 0, `the backup succeeded: ${done.stderr}`);
  const v2 = JSON.parse(done.stdout) as VersionJson;
  t.log(`backup: ${v2.stats.blocks_deduplicated} deduplicated, ${v2.stats.blocks_written} written; cleanup deleted ${sweep.deleted}`);
  t.true(v2.stats.blocks_deduplicated > 0, 'the blocks the backup had reached were deduplicated, not deleted');
  t.is(v2.stats.blocks_written, sweep.deleted, 'every deleted block was written again');
  t.is(v2.stats.blocks_deduplicated + v2.stats.blocks_written, BLOCKS);
  await nothingLost(t, repo, dir, v2, A.path, BLOCKS);
});
