/**
 * Incremental backups through the real CLI: `--from` + `--hints` reads only the blocks the hints name (plus a
 * verification sample of the others) and takes the rest from the base version; a lying hints file is caught
 * by the sample; without hints everything is read but only new blocks are written; discards, grown and
 * shrunk sources, and broken hints files.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { assertCliError, backupJson as backupJsonBase, initRepo, MiB, prngBytes, runCli, runJson, sha256File, type RepoFixture } from './helpers.js';
import { fastTempDir, lsJson, type FullVersion, mkimage, nonZeroBlocks, randomFile, readHints, touchedBlocks, writeHints, type HintEntry } from './cliHarness.js';

const BS = MiB; // 1 MiB blocks: many blocks per image, so the counts mean something
const SAMPLE_MIN = 10;
const SAMPLE_FRACTION = 0.001;

/** How many untouched blocks the backup must re-read to check the hints (documented rule). */
const expectedSample = (untouched: number) => Math.min(untouched, Math.max(SAMPLE_MIN, Math.ceil(untouched * SAMPLE_FRACTION)));

async function restoreAndCompare(t: ExecutionContext, repo: RepoFixture, dir: string, v: FullVersion, source: string): Promise<void> {
  const target = path.join(dir, `restore-${v.id}.img`);
  const r = await runJson<{ bytes_written: number; damaged: unknown[]; size: number }>(['restore', ...repo.args, v.id, target], { env: repo.env });
  t.deepEqual(r.damaged, []);
  t.is(r.size, (await fs.stat(source)).size);
  t.is((await fs.stat(target)).size, (await fs.stat(source)).size, 'restored size');
  t.is(await sha256File(target), await sha256File(source), `restore of ${v.id} is byte-identical to ${path.basename(source)}`);
}

/** Overwrites `length` bytes at `offset` of `file` with pseudo-random data (or zeros). */
async function overwrite(file: string, offset: number, length: number, seed: string | null): Promise<void> {
  const fh = await fs.open(file, 'r+');
  try {
    const buf = seed === null ? Buffer.alloc(length) : prngBytes(seed, `ow${offset}`, length);
    await fh.write(buf, 0, length, offset);
  } finally {
    await fh.close();
  }
}

const backupJson = (repo: RepoFixture, source: string, name: string, extra: string[] = []) => backupJsonBase(repo, source, name, extra) as Promise<FullVersion>;

const count = (xs: Iterable<boolean>) => [...xs].filter(Boolean).length;

// --------------------------------------------------------------------------------------------- (a)

test('1 % scattered mutation with hints (encrypted repo): reads exactly the touched blocks plus the sample, references the rest, restores byte-identical', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' }); // default encryption
  const base = path.join(dir, 'base.img');
  const next = path.join(dir, 'next.img');
  const hintsFile = path.join(dir, 'next.hints.json');
  // --zero 0: no all-zero cells, so every block outside the hints is data and the counts are exact
  await mkimage(['gen', '--out', base, '--size', '64M', '--seed', '11', '--zero', '0', '--rand', '0.75']);
  const m = await mkimage<{ regions: number }>(['mutate', '--base', base, '--out', next, '--seed', '12', '--fraction', '0.01', '--region', '64K', '--hints', hintsFile]);
  t.true(m.regions >= 5, 'the mutation touched several regions');

  const v1 = await backupJson(repo, base, 'disk');
  t.true(v1.complete);

  const size = (await fs.stat(next)).size;
  const total = Math.ceil(size / BS);
  const nz = await nonZeroBlocks(next, BS);
  t.is(count(nz), total, 'precondition: the image has no all-zero block');
  const touched = touchedBlocks(await readHints(hintsFile), BS, size);
  const untouched = total - touched.size;
  t.true(untouched > SAMPLE_MIN, 'precondition: more untouched blocks than the minimum sample');

  const v2 = await backupJson(repo, next, 'disk', ['--from', v1.id, '--hints', hintsFile]);
  const s = v2.stats;
  t.true(v2.complete);
  t.is(v2.base, v1.id);
  t.is(s.blocks_sampled, expectedSample(untouched), 'sample size: max(10, 0.1 %) of the untouched blocks');
  t.is(s.blocks_read, touched.size + s.blocks_sampled, 'read = touched blocks + sampled blocks, nothing else');
  t.is(s.bytes_read, s.blocks_read * BS);
  t.is(s.blocks_referenced, total - touched.size - s.blocks_sampled, 'every other block is taken from the base unread');
  t.is(s.blocks_referenced + touched.size + s.blocks_sampled + s.blocks_sparse, total);
  t.is(s.blocks_sparse, 0);
  t.is(s.blocks_written, touched.size, 'only the changed blocks are new');

  await restoreAndCompare(t, repo, dir, v2, next);
});

test('hints on an image with zero regions: read + referenced = non-zero blocks, sparse = zero blocks, touched reads counted exactly', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const base = path.join(dir, 'base.img');
  const next = path.join(dir, 'next.img');
  const hintsFile = path.join(dir, 'next.hints.json');
  await mkimage(['gen', '--out', base, '--size', '64M', '--seed', '1']); // ~50 % zero cells
  await mkimage(['mutate', '--base', base, '--out', next, '--seed', '2', '--fraction', '0.01', '--region', '64K', '--hints', hintsFile]);
  const v1 = await backupJson(repo, base, 'vol');

  const size = (await fs.stat(next)).size;
  const total = Math.ceil(size / BS);
  const nz = await nonZeroBlocks(next, BS);
  const touched = touchedBlocks(await readHints(hintsFile), BS, size);
  const touchedNonZero = [...touched].filter((b) => nz[b]).length;
  const untouched = total - touched.size;
  const untouchedZero = nz.filter((x, b) => !x && !touched.has(b)).length;
  const untouchedNonZero = untouched - untouchedZero;
  t.true(untouchedZero > 0 && untouchedNonZero > 0, 'precondition: untouched zero and data blocks');

  const v2 = await backupJson(repo, next, 'vol', ['--from', v1.id, '--hints', hintsFile]);
  const s = v2.stats;
  t.is(s.blocks_sampled, expectedSample(untouched));
  const sampledNonZero = s.blocks_read - touchedNonZero;
  t.true(sampledNonZero >= Math.max(0, s.blocks_sampled - untouchedZero), `sampled data blocks ${sampledNonZero}`);
  t.true(sampledNonZero <= Math.min(s.blocks_sampled, untouchedNonZero), `sampled data blocks ${sampledNonZero}`);
  t.is(s.blocks_read + s.blocks_referenced, count(nz), 'each data block is either read or referenced');
  t.is(s.blocks_referenced, untouchedNonZero - sampledNonZero);
  t.is(s.blocks_sparse, total - count(nz));
  await restoreAndCompare(t, repo, dir, v2, next);
});

// --------------------------------------------------------------------------------------------- (b)

test('a lying hints file (one changed extent left out) is caught by the sample: exit 1, clear error, no version', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  // 8 blocks: fewer untouched blocks than the minimum sample (10), so every untouched block is re-read and
  // the check is deterministic. Block 5 is zero in the base, so a lie about a sparse block is covered too.
  const base = path.join(dir, 'base.img');
  const next = path.join(dir, 'next.img');
  await randomFile(base, 8 * MiB, 'b-base');
  await overwrite(base, 5 * BS, BS, null);
  const v1 = await backupJson(repo, base, 'vol');
  await fs.copyFile(base, next);
  const hints: HintEntry[] = [
    { offset: 1 * BS + 65536, length: 65536, exists: 'true' },
    { offset: 5 * BS + 3 * 65536, length: 65536, exists: 'true' },
    { offset: 7 * BS + 4096, length: 512, exists: 'true' },
  ];
  for (const h of hints) await overwrite(next, h.offset, h.length, `lie${h.offset}`);
  const hintsFile = path.join(dir, 'next.hints.json');
  await writeHints(hintsFile, hints);

  // leave out each changed extent in turn
  for (const [victim, h] of hints.entries()) {
    const lieFile = path.join(dir, `lie${victim}.hints.json`);
    await writeHints(
      lieFile,
      hints.filter((_, i) => i !== victim),
    );
    const lostBlock = Math.floor(h.offset / BS);
    // --json: no progress lines on stderr (a slow run prints some), so the error contract can be checked exactly
    const r = await runCli(['backup', ...repo.args, next, 'vol', '--from', v1.id, '--hints', lieFile, '--json'], { env: repo.env });
    const msg = assertCliError(t, r, 1, /hints/i);
    t.regex(msg, /wrong/i);
    t.regex(msg, new RegExp(`block ${lostBlock}\\b`), `names block ${lostBlock}, which changed behind the hints' back`);
    t.regex(msg, /no version was created/i);
  }
  t.deepEqual(
    (await lsJson(repo)).map((v) => v.id),
    [v1.id],
    'no new (or half) version is listed',
  );
  // The repository is still consistent and usable: the honest hints work.
  const ok = await backupJson(repo, next, 'vol', ['--from', v1.id, '--hints', hintsFile]);
  t.true(ok.complete);
  t.is(ok.stats.blocks_sampled, 5, 'all 5 untouched blocks were checked');
  t.is(ok.stats.blocks_read, 3 + 5);
  await restoreAndCompare(t, repo, dir, ok, next);
});

// --------------------------------------------------------------------------------------------- (c)

test('without hints: an unchanged image writes nothing; --from defaults to the newest complete version of the name', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const img = path.join(dir, 'img');
  await randomFile(img, 32 * MiB, 'c');
  for (let b = 1; b < 32; b += 4) await overwrite(img, b * BS, BS, null); // some zero blocks
  const total = 32;
  const nz = await nonZeroBlocks(img, BS);

  const v1 = await backupJson(repo, img, 'root');
  t.is(v1.base, null, 'the first backup of a name has no base');
  const v2 = await backupJson(repo, img, 'root');
  t.is(v2.base, v1.id, 'base defaults to the newest complete version');
  t.is(v2.stats.blocks_written, 0, 'an unchanged image writes no block');
  t.is(v2.stats.bytes_written, 0);
  t.is(v2.stats.blocks_read, count(nz), 'without hints every data block is read');
  t.is(v2.stats.blocks_deduplicated, count(nz));
  t.is(v2.stats.blocks_referenced, 0, 'nothing is referenced unread without hints');
  t.is(v2.stats.blocks_sampled, 0);
  t.is(v2.stats.blocks_sparse, total - count(nz));

  // change two blocks; the default base is now v2 (the newest), and only the two new blocks are written
  await overwrite(img, 5 * BS + 4096, 100, 'c1');
  await overwrite(img, 20 * BS, 64 * 1024, 'c2');
  const nz3 = await nonZeroBlocks(img, BS);
  const v3 = await backupJson(repo, img, 'root');
  t.is(v3.base, v2.id);
  t.is(v3.stats.blocks_written, 2);
  t.is(v3.stats.blocks_read, count(nz3));

  // an explicit --from wins
  const v4 = await backupJson(repo, img, 'root', ['--from', v1.id]);
  t.is(v4.base, v1.id);
  t.is(v4.stats.blocks_written, 0, 'the changed blocks are already stored (by v3)');
  await restoreAndCompare(t, repo, dir, v4, img);
});

// --------------------------------------------------------------------------------------------- (d)

test('exists:false extents: fully discarded blocks become sparse, partly discarded ones are read; restore byte-identical', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const base = path.join(dir, 'base.img');
  const next = path.join(dir, 'next.img');
  await randomFile(base, 16 * MiB, 'd-base');
  const v1 = await backupJson(repo, base, 'vol');
  await fs.copyFile(base, next);
  await overwrite(next, 3 * BS, BS, null);
  await overwrite(next, 6 * BS, 2 * BS, null);
  await overwrite(next, 10 * BS, BS / 2, null);
  await overwrite(next, 12 * BS + 4096, 8192, 'd-new');
  const hints: HintEntry[] = [
    { offset: 3 * BS, length: BS, exists: 'false' },
    { offset: 6 * BS, length: 2 * BS, exists: 'false' },
    { offset: 10 * BS, length: BS / 2, exists: 'false' },
    { offset: 12 * BS + 4096, length: 8192, exists: 'true' },
  ];
  const hintsFile = path.join(dir, 'hints.json');
  await writeHints(hintsFile, hints);
  const v2 = await backupJson(repo, next, 'vol', ['--from', v1.id, '--hints', hintsFile]);
  const s = v2.stats;
  const untouched = 16 - 5;
  t.is(s.blocks_sampled, expectedSample(untouched));
  t.is(s.blocks_sparse, 3, 'blocks 3, 6 and 7 are sparse');
  t.is(s.blocks_read, 2 + s.blocks_sampled, 'blocks 10 (partly discarded) and 12 are read, plus the sample');
  t.is(s.blocks_referenced, untouched - s.blocks_sampled);
  t.is(s.blocks_written, 2);
  await restoreAndCompare(t, repo, dir, v2, next);
});

test('exists:false blocks are not read at all: data still in the source there is not looked at', async (t) => {
  // Proof by contradiction: the source still holds (old) data in a block the hints call discarded. Had the
  // backup read it, the version would hold that data; it must hold zeros instead.
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const img = path.join(dir, 'img');
  await randomFile(img, 8 * MiB, 'd2');
  const v1 = await backupJson(repo, img, 'vol');
  const hintsFile = path.join(dir, 'hints.json');
  await writeHints(hintsFile, [{ offset: 2 * BS, length: BS, exists: 'false' }]);
  const v2 = await backupJson(repo, img, 'vol', ['--from', v1.id, '--hints', hintsFile]);
  t.is(v2.stats.blocks_sparse, 1);
  t.is(v2.stats.blocks_read, v2.stats.blocks_sampled, 'only the sample was read');
  t.is(v2.stats.blocks_sampled, 7, 'all 7 untouched blocks are sampled (fewer than 10)');
  const target = path.join(dir, 'out');
  await runJson(['restore', ...repo.args, v2.id, target], { env: repo.env });
  const expected = await fs.readFile(img);
  expected.fill(0, 2 * BS, 3 * BS);
  const got = await fs.readFile(target);
  t.true(
    got.subarray(2 * BS, 3 * BS).every((b) => b === 0),
    'the discarded block is restored as zeros',
  );
  t.true(got.equals(expected), 'everything else is the source');
});

test('overlapping exists:false extents covering only half of a block do not make it sparse (no data loss)', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const base = path.join(dir, 'base.img');
  const next = path.join(dir, 'next.img');
  await randomFile(base, 4 * MiB, 'ov');
  const v1 = await backupJson(repo, base, 'vol');
  await fs.copyFile(base, next);
  await overwrite(next, BS, BS / 2, null); // first half of block 1 discarded; its second half keeps data
  const hintsFile = path.join(dir, 'hints.json');
  // the same discard reported twice (e.g. two merged diffs): 512 KiB + 512 KiB, but only half the block
  await writeHints(hintsFile, [
    { offset: BS, length: BS / 2, exists: 'false' },
    { offset: BS, length: BS / 2, exists: 'false' },
  ]);
  const v2 = await backupJson(repo, next, 'vol', ['--from', v1.id, '--hints', hintsFile]);
  t.is(v2.stats.blocks_sparse, 0, 'block 1 still holds data');
  await restoreAndCompare(t, repo, dir, v2, next);
});

// --------------------------------------------------------------------------------------------- (e)

test('with hints, a source that grew and one that shrank (unaligned sizes) restore byte-identical', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const base = path.join(dir, 'base.img');
  const baseSize = 16 * MiB + 300 * 1024; // partial last block
  await randomFile(base, baseSize, 'e-base');
  await overwrite(base, 4 * BS, 2 * BS, null); // some zero blocks too
  const v1 = await backupJson(repo, base, 'vol');

  // grown: two changed regions named by the hints; the growth itself is not named (it is not in the base)
  const grown = path.join(dir, 'grown.img');
  await fs.copyFile(base, grown);
  await overwrite(grown, 2 * BS + 65536, 65536, 'g1');
  await overwrite(grown, 9 * BS, 65536, 'g2');
  const grownSize = 20 * MiB + 100 * 1024;
  await fs.appendFile(grown, prngBytes('e', 'growth', grownSize - baseSize));
  const grownHints = path.join(dir, 'grown.hints.json');
  await writeHints(grownHints, [
    { offset: 2 * BS + 65536, length: 65536, exists: 'true' },
    { offset: 9 * BS, length: 65536, exists: 'true' },
  ]);
  const vg = await backupJson(repo, grown, 'vol', ['--from', v1.id, '--hints', grownHints]);
  t.is(vg.size, grownSize);
  // blocks 16..20 do not exist (16 is partial) in the base with the same length: they must be read
  t.true(vg.stats.blocks_read >= 2 + 5, `read ${vg.stats.blocks_read}`);
  t.is(vg.stats.blocks_sparse, 2);
  await restoreAndCompare(t, repo, dir, vg, grown);

  // shrunk: cut to 12.5 MiB; one changed region, and an extent past the new end that must be ignored
  const shrunk = path.join(dir, 'shrunk.img');
  await fs.copyFile(base, shrunk);
  const shrunkSize = 12 * MiB + 500 * 1024;
  await fs.truncate(shrunk, shrunkSize);
  await overwrite(shrunk, 7 * BS, 4096, 's1');
  const shrunkHints = path.join(dir, 'shrunk.hints.json');
  await writeHints(shrunkHints, [
    { offset: 7 * BS, length: 4096, exists: 'true' },
    { offset: 14 * BS, length: 2 * BS, exists: 'true' },
  ]);
  const vs = await backupJson(repo, shrunk, 'vol', ['--from', v1.id, '--hints', shrunkHints]);
  t.is(vs.size, shrunkSize);
  // 13 blocks: block 7 is hinted, the partial block 12 cannot be compared with the base, and of the 11
  // untouched comparable ones 10 are sampled (read): exactly one comes from the base unread (it is
  // referenced, or sparse when it is one of the zero blocks 4 and 5).
  t.is(vs.stats.blocks_sampled, 10);
  t.is(vs.stats.blocks_read + vs.stats.blocks_referenced + vs.stats.blocks_sparse, 13);
  t.true(vs.stats.blocks_read <= 11, `read ${vs.stats.blocks_read}: not every unchanged block was read`);
  await restoreAndCompare(t, repo, dir, vs, shrunk);
});

test('grown source: the hints sample has max(10, 0.1 %) blocks that can really be compared with the base', async (t) => {
  // Base: 11 full blocks + a partial one (11); the source grew to 13 full blocks. Block 3 changed (hinted).
  // Untouched blocks that can be compared with the base: 0-10 without 3 = 10, so all 10 must be checked.
  // Block 11 had another length in the base: it is read anyway, and must not take a place in the sample.
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const base = path.join(dir, 'base.img');
  await randomFile(base, 11 * MiB + 300 * 1024, 'sample-base');
  const v1 = await backupJson(repo, base, 'vol');
  const grown = path.join(dir, 'grown.img');
  await fs.copyFile(base, grown);
  await overwrite(grown, 3 * BS, 4096, 'sample-change');
  await fs.appendFile(grown, prngBytes('sample', 'growth', 13 * MiB - (11 * MiB + 300 * 1024)));
  const hintsFile = path.join(dir, 'hints.json');
  await writeHints(hintsFile, [{ offset: 3 * BS, length: 4096, exists: 'true' }]);
  // the sample is random: repeat so that a wasted place shows up (it would, with probability 10/11 each time)
  for (let run = 0; run < 3; run++) {
    const v = await backupJson(repo, grown, 'vol', ['--from', v1.id, '--hints', hintsFile]);
    t.is(v.stats.blocks_sampled, 10, `run ${run}: all 10 comparable untouched blocks are checked`);
    t.is(v.stats.blocks_referenced, 0);
    t.is(v.stats.blocks_read, 13, 'touched (1) + sampled (10) + grown or resized (2)');
  }
});

// --------------------------------------------------------------------------------------------- (f)

test('a truncated hints file: exit 2, one clear line, no version created', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const img = path.join(dir, 'img');
  await randomFile(img, 4 * MiB, 'f');
  const v1 = await backupJson(repo, img, 'vol');
  const full = JSON.stringify([
    { offset: 0, length: 65536, exists: 'true' },
    { offset: 2 * BS, length: 65536, exists: 'true' },
  ]);
  const hintsFile = path.join(dir, 'trunc.hints.json');
  await fs.writeFile(hintsFile, full.slice(0, full.length - 20));
  const r = await runCli(['backup', ...repo.args, img, 'vol', '--from', v1.id, '--hints', hintsFile], { env: repo.env });
  const msg = assertCliError(t, r, 2, /hints/i);
  t.true(msg.includes(hintsFile), 'names the file');
  t.regex(msg, /truncated|not valid JSON/i);
  t.deepEqual(
    (await lsJson(repo)).map((v) => v.id),
    [v1.id],
  );

  // a missing hints file: a failure naming it, nothing created
  const missing = path.join(dir, 'missing.json');
  const r2 = await runCli(['backup', ...repo.args, img, 'vol', '--from', v1.id, '--hints', missing], { env: repo.env });
  t.not(r2.code, 0);
  t.true(r2.stderr.includes(missing));
  // --hints without any base version of the name: usage error
  await fs.writeFile(path.join(dir, 'ok.json'), '[]');
  const r4 = await runCli(['backup', ...repo.args, img, 'fresh', '--hints', path.join(dir, 'ok.json')], { env: repo.env });
  assertCliError(t, r4, 2, /--from|base/);
  t.deepEqual(
    (await lsJson(repo)).map((v) => v.id),
    [v1.id],
    'still only the first version',
  );
});
