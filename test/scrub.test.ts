/**
 * Integrity through the real CLI (issue 4): scrub finds bit flips, truncations, deletions and replacements of
 * block objects, marks the block and exactly the versions using it invalid, exits 3 and lists the damage;
 * restore of an invalid version writes every readable block; the next backup heals; --percent cycles cover
 * every block exactly once; shared blocks are read once; deep scrub against a changed source; `check`.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { differingBlocks, initRepo, makeImage, MiB, prngBytes, sha256File, type BlockSpec, type Image, type RepoFixture, type VersionJson } from './helpers.js';
import {
  cliJson,
  damageObject,
  isZeroRange,
  objects,
  okJson,
  overwriteAt,
  readSinceReset,
  resetAtimes,
  shmDir,
  validity,
  type CheckJson,
  type Damage,
  type RestoreJson,
  type ScrubJson,
} from './lcHarness.js';

const BS = MiB;

async function backup(repo: RepoFixture, source: string, name: string, extra: string[] = []): Promise<VersionJson> {
  return okJson<VersionJson>(repo, ['backup', source, name, ...extra]);
}

/** Restores `version` to a new file and checks it against `image`: returns the restore report and exit code. */
async function restoreTo(repo: RepoFixture, dir: string, version: string, label: string): Promise<{ code: number | null; report: RestoreJson; target: string }> {
  const target = path.join(dir, `restore-${label}.img`);
  const r = await cliJson<RestoreJson>(repo, ['restore', version, target]);
  return { code: r.code, report: r.json, target };
}

interface TwoVolumes {
  repoDir: string;
  env: Record<string, string>;
  A: Image;
  vA: VersionJson;
  vB: VersionJson;
  /** Block objects of A, and of A and B together. */
  objsA: string[];
  objsAll: string[];
}

/** A repository with volume "a" (image A) and volume "b" (image B, different data), built in `dir`. */
async function buildTwoVolumes(dir: string, encrypted: boolean): Promise<TwoVolumes> {
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', ...(encrypted ? {} : { encryption: 'none' as const }) });
  const aBlocks: BlockSpec[] = ['random', 'text', 'random', 'zero', 'text', 'random', 'random', 'text', 'random', 'random', 'text', 'random'];
  const A = await makeImage(path.join(dir, 'a.img'), { blockSize: BS, blocks: aBlocks, seed: `A-${encrypted}`, tail: { bytes: 300_000, kind: 'random' } });
  const B = await makeImage(path.join(dir, 'b.img'), { blockSize: BS, blocks: ['random', 'text', 'random', 'random', 'text', 'random'], seed: `B-${encrypted}` });
  const vA = await backup(repo, A.path, 'a');
  const objsA = [...(await objects(repo.dir)).keys()].sort();
  const vB = await backup(repo, B.path, 'b');
  const objsAll = [...(await objects(repo.dir)).keys()].sort();
  return { repoDir: repo.dir, env: repo.env, A, vA, vB, objsA, objsAll };
}

/**
 * The plain (unencrypted) two-volume repository is built once and copied for each test that needs it (the
 * index is an LMDB environment nobody has open between commands, so a copy is a valid repository).
 */
let plainTemplate: Promise<TwoVolumes> | undefined;
let templateDir: string | undefined;
test.after.always(async () => {
  if (templateDir) await fs.rm(templateDir, { recursive: true, force: true });
});

async function twoVolumes(t: ExecutionContext, encrypted = false) {
  const dir = await shmDir(t);
  let tv: TwoVolumes;
  let repo: RepoFixture;
  if (encrypted) {
    tv = await buildTwoVolumes(dir, true);
    repo = { dir: tv.repoDir, args: ['--repo', tv.repoDir], env: tv.env };
  } else {
    plainTemplate ??= (async () => {
      templateDir = await fs.mkdtemp(path.join(path.dirname(dir), 'blocksafe-scrub-template-'));
      return buildTwoVolumes(templateDir, false);
    })();
    tv = await plainTemplate;
    const repoDir = path.join(dir, 'repo');
    await fs.cp(tv.repoDir, repoDir, { recursive: true });
    repo = { dir: repoDir, args: ['--repo', repoDir], env: {} };
  }
  const all = await objects(repo.dir);
  t.deepEqual([...all.keys()].sort(), tv.objsAll);
  t.is(tv.objsA.length, 12, 'precondition: 12 distinct non-zero blocks in A (12 blocks with one zero, plus the tail)');
  t.is(tv.objsAll.length - tv.objsA.length, 6, 'precondition: B shares nothing with A');
  return { dir, repo, A: tv.A, vA: tv.vA, vB: tv.vB, objsA: tv.objsA, all };
}

/** Every block of `restored` equals `image` except `bad` (block indexes), which read as zeros (left unwritten). */
async function assertRestoredExcept(t: ExecutionContext, restored: string, image: Image, bad: number[]): Promise<void> {
  t.deepEqual(await differingBlocks(restored, image), bad, 'exactly the damaged blocks differ from the source');
  for (const i of bad) t.true(await isZeroRange(restored, i * image.blockSize, Math.min(image.blockSize, image.size - i * image.blockSize)), `damaged block ${i} left unwritten`);
  // the damaged blocks are all copies of one block: one damaged object
  t.is(new Set(bad.map((i) => image.blockHashes[i])).size, 1, 'all damaged ranges hold the same (damaged) block');
}

const REASON: Record<Damage, RegExp> = {
  bitflip: /damaged/,
  truncate: /damaged/,
  delete: /missing/,
  replace: /damaged/,
};

async function damageFoundMarkedHealed(t: ExecutionContext, kind: Damage, opts: { encrypted?: boolean; healWithHints?: boolean; restoreHealed?: boolean; listInvalid?: boolean } = {}): Promise<void> {
  const { dir, repo, A, vA, vB, objsA, all } = await twoVolumes(t, opts.encrypted);
  const victim = objsA[4]!;
  await damageObject(all.get(victim)!, kind, all.get(objsA[7]!));

  if (kind === 'delete') {
    // the cheap check (a listing, no reads) already sees a deleted object, and a stray one
    const stray = 'ab'.repeat(32);
    await fs.mkdir(path.join(repo.dir, 'data', 'ab'), { recursive: true });
    await fs.copyFile(all.get(objsA[7]!)!, path.join(repo.dir, 'data', 'ab', stray));
    const check = await cliJson<CheckJson>(repo, ['check']);
    t.is(check.code, 3, 'check exits 3 when an object is missing');
    t.deepEqual(check.json, { objects_in_store: all.size, blocks_in_index: all.size, missing_objects: [victim], unknown_objects: [stray] });
    await fs.rm(path.join(repo.dir, 'data', 'ab', stray));
  }

  // found, marked, reported
  const s1 = await cliJson<ScrubJson>(repo, ['scrub', '--all']);
  t.is(s1.code, 3, `scrub exits 3 after a ${kind}`);
  t.is(s1.json.blocks_selected, all.size);
  t.is(s1.json.blocks_checked, all.size);
  t.deepEqual(
    s1.json.damaged.map((d) => d.checksum),
    [victim],
    'exactly the damaged block is listed',
  );
  t.regex(s1.json.damaged[0]!.reason, REASON[kind]);
  t.deepEqual(s1.json.invalidated_versions, [vA.id], 'the version using the block is marked invalid');
  t.deepEqual(s1.json.invalid_versions, [vA.id], 'the other volume stays valid');
  if (opts.listInvalid) t.deepEqual(await validity(repo), { [vA.id]: false, [vB.id]: true }, 'ls --json: a invalid, b valid');

  // restore of the invalid version: every readable block, exit 3, the damaged range reported
  const r1 = await restoreTo(repo, dir, vA.id, 'invalid');
  t.is(r1.code, 3, 'restore of a damaged version exits 3');
  t.true(r1.report.damaged.length >= 1);
  const badBlocks = blocksOf(r1.report.damaged);
  t.is(
    r1.report.damaged.reduce((n, d) => n + d.length, 0),
    badBlocks.reduce((n, i) => n + Math.min(BS, A.size - i * BS), 0),
    'damaged ranges are whole blocks',
  );
  await assertRestoredExcept(t, r1.target, A, badBlocks);
  t.is((await fs.stat(r1.target)).size, A.size);

  // the next backup of the same data heals (with hints saying nothing changed, too)
  const heal = await backup(repo, A.path, 'a', opts.healWithHints ? ['--from', vA.id, '--hints', await emptyHints(dir)] : []);
  t.is(heal.stats.blocks_written, 1, 'the next backup re-stored exactly the invalid block');
  t.true(heal.valid);
  t.true((await objects(repo.dir)).has(victim), 'the object is back');
  t.deepEqual(await validity(repo), { [vA.id]: true, [vB.id]: true, [heal.id]: true }, 'all versions valid again');

  const s2 = await cliJson<ScrubJson>(repo, ['scrub', '--all']);
  t.is(s2.code, 0, 'a scrub after healing is clean');
  t.deepEqual(s2.json.damaged, []);
  t.deepEqual(s2.json.invalid_versions, []);
  t.is(s2.json.blocks_checked, all.size);

  if (opts.restoreHealed) {
    // the healed old version restores byte-identical
    const r2 = await restoreTo(repo, dir, vA.id, 'healed');
    t.is(r2.code, 0);
    t.deepEqual(r2.report.damaged, []);
    t.is(await sha256File(r2.target), A.sha256);
  }
}

/** Block indexes covered by damaged ranges (which start on block boundaries). */
function blocksOf(ranges: { offset: number; length: number }[]): number[] {
  const out: number[] = [];
  for (const d of ranges) {
    if (d.offset % BS !== 0) throw new Error(`damaged range at ${d.offset} does not start on a block boundary`);
    for (let i = d.offset / BS; i * BS < d.offset + d.length; i++) out.push(i);
  }
  return out;
}

async function emptyHints(dir: string): Promise<string> {
  const file = path.join(dir, 'nothing-changed.json');
  await fs.writeFile(file, '[]\n');
  return file;
}

test('bit flip in a block object of an encrypted repository (passphrase): found, marked, restore writes the rest, next backup heals', (t) =>
  damageFoundMarkedHealed(t, 'bitflip', { encrypted: true }));
test('truncated block object: found, marked, restore writes the rest, next backup (with hints "unchanged") heals', (t) => damageFoundMarkedHealed(t, 'truncate', { healWithHints: true }));
test('deleted block object: check and scrub find it, marked, restore writes the rest, next backup heals', (t) => damageFoundMarkedHealed(t, 'delete', { listInvalid: true }));
test('block object replaced by another valid object (no encryption: only the checksum catches it): found, marked, healed', (t) => damageFoundMarkedHealed(t, 'replace', { restoreHealed: true }));

test('--percent 25 run 4 times reads every block exactly once; the 5th run starts a new cycle with the oldest-verified blocks', async (t) => {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', encryption: 'none' });
  // 16 + 4 changed + 8 new in B (which also holds 2 blocks of A) = 28 distinct blocks: 25 % is exactly 7
  const A = await makeImage(path.join(dir, 'a.img'), { blockSize: BS, blocks: Array<BlockSpec>(16).fill('random'), seed: 'pctA' });
  await backup(repo, A.path, 'a');
  for (const i of [1, 5, 9, 13]) await overwriteAt(A.path, i * BS, prngBytes('pct-change', `b${i}`, BS));
  await backup(repo, A.path, 'a');
  const B = await makeImage(path.join(dir, 'b.img'), { blockSize: BS, blocks: Array<BlockSpec>(8).fill('random'), seed: 'pctB' });
  await fs.appendFile(B.path, Buffer.concat([await fs.readFile(A.path).then((b) => b.subarray(0, 2 * BS))]));
  await backup(repo, B.path, 'b');
  const everything = [...(await objects(repo.dir)).keys()].sort();
  t.is(everything.length, 28, 'precondition: 28 distinct blocks');

  const runs: string[][] = [];
  const dues: (number | null)[] = [];
  for (let run = 0; run < 5; run++) {
    await resetAtimes(repo.dir);
    const s = await cliJson<ScrubJson>(repo, ['scrub', '--all', '--percent', '25']);
    t.is(s.code, 0);
    t.is(s.json.blocks_selected, 28);
    t.is(s.json.blocks_checked, 7, `run ${run + 1} checks ceil(25 % of 28) = 7 blocks`);
    t.is(s.json.bytes_checked, 7 * BS);
    const read = await readSinceReset(repo.dir);
    t.is(read.length, 7, `run ${run + 1} read exactly the 7 blocks it checked`);
    runs.push(read);
    dues.push(s.json.blocks_due);
  }
  t.deepEqual(dues, [21, 14, 7, 0, 21]);
  const firstCycle = runs.slice(0, 4).flat();
  t.is(new Set(firstCycle).size, 28, 'no block read twice in one cycle');
  t.deepEqual([...firstCycle].sort(), everything, 'four runs cover every block');
  t.deepEqual(runs[4], runs[0], 'the new cycle starts with the blocks verified longest ago');
});

test('a block shared by several versions is selected and read once; a damaged shared block invalidates every version using it', async (t) => {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', encryption: 'none' });
  // 10 blocks, 2 of them copies of block 1 (the only text block): 8 distinct
  const A = await makeImage(path.join(dir, 'a.img'), {
    blockSize: BS,
    blocks: ['random', 'text', 'random', { dup: 1 }, 'random', 'random', { dup: 1 }, 'random', 'random', 'random'],
    seed: 'shared',
  });
  const v1 = await backup(repo, A.path, 'a');
  const v2 = await backup(repo, A.path, 'a');
  const v3 = await backup(repo, A.path, 'copy');
  const objs = await objects(repo.dir);
  t.is(objs.size, 8);
  const sizes = new Map<string, number>();
  for (const p of objs.values()) sizes.set(p, (await fs.stat(p)).size);
  const statSize = (p: string) => sizes.get(p)!;

  await resetAtimes(repo.dir);
  const all = await cliJson<ScrubJson>(repo, ['scrub', '--all']);
  t.is(all.code, 0);
  t.is(all.json.blocks_selected, 8, 'distinct blocks, not 3 × 10');
  t.is(all.json.blocks_checked, 8);
  t.is(all.json.bytes_checked, 8 * BS);
  t.is((await readSinceReset(repo.dir)).length, 8);

  const named = await cliJson<ScrubJson>(repo, ['scrub', v1.id, v2.id, v3.id]);
  t.is(named.code, 0);
  t.is(named.json.blocks_selected, 8);
  t.is(named.json.bytes_checked, 8 * BS);

  // the duplicated text block (the only compressible one, so the smallest object) is damaged: every
  // version uses it, so all three become invalid
  const [victim, victimPath] = [...objs].sort((x, y) => statSize(x[1]) - statSize(y[1]))[0]!;
  await damageObject(victimPath, 'bitflip');
  t.not(victim, '', 'found the object of the duplicated block 0');
  const s = await cliJson<ScrubJson>(repo, ['scrub', '--all']);
  t.is(s.code, 3);
  t.deepEqual(
    s.json.damaged.map((d) => d.checksum),
    [victim],
  );
  t.deepEqual([...s.json.invalidated_versions].sort(), [v1.id, v2.id, v3.id].sort());
  t.deepEqual(await validity(repo), { [v1.id]: false, [v2.id]: false, [v3.id]: false });
  const r = await cliJson<RestoreJson>(repo, ['restore', v2.id, path.join(dir, 'r.img')]);
  t.is(r.code, 3);
  t.deepEqual(blocksOf(r.json.damaged), [1, 3, 6], 'each use of the damaged block is reported');
  const heal = await backup(repo, A.path, 'copy');
  t.is(heal.stats.blocks_written, 1);
  t.deepEqual(await validity(repo), { [v1.id]: true, [v2.id]: true, [v3.id]: true, [heal.id]: true });
});

test('deep scrub against a source changed in one block reports exactly that block and invalidates nothing', async (t) => {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', encryption: 'none' });
  const A = await makeImage(path.join(dir, 'a.img'), {
    blockSize: BS,
    blocks: ['random', 'text', 'zero', 'random', 'text', 'random', 'zero', 'random'],
    seed: 'deep',
    tail: { bytes: 123_456, kind: 'text' },
  });
  const v = await backup(repo, A.path, 'a');

  const same = await cliJson<ScrubJson>(repo, ['scrub', v.id, '--source', A.path]);
  t.is(same.code, 0);
  t.deepEqual(same.json.source_differences, [], 'an unchanged source equals the version');

  // one changed byte in block 5
  const byte = await fs.readFile(A.path).then((b) => b[5 * BS + 777]!);
  await overwriteAt(A.path, 5 * BS + 777, Buffer.from([byte ^ 0xff]));
  const one = await cliJson<ScrubJson>(repo, ['scrub', v.id, '--source', A.path]);
  t.is(one.code, 0, 'a difference from the source does not change the exit code');
  t.deepEqual(one.json.source_differences, [{ block: 5, offset: 5 * BS, length: BS }]);
  t.deepEqual(one.json.damaged, []);
  t.deepEqual(one.json.invalidated_versions, []);
  t.deepEqual(one.json.invalid_versions, []);
  t.true((await validity(repo))[v.id], 'the version stays valid');

  // a sparse (all-zero) block that got data is a difference too, as is a changed tail
  await overwriteAt(A.path, 6 * BS + 10, Buffer.from('not zero any more'));
  await overwriteAt(A.path, 8 * BS + 5, Buffer.from('tail changed'));
  const three = await cliJson<ScrubJson>(repo, ['scrub', v.id, '--source', `file://${A.path}`]);
  t.is(three.code, 0);
  t.deepEqual(three.json.source_differences, [
    { block: 5, offset: 5 * BS, length: BS },
    { block: 6, offset: 6 * BS, length: BS },
    { block: 8, offset: 8 * BS, length: 123_456 },
  ]);
});
