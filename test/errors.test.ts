import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test from 'ava';
import { blockChecksum } from '../src/codec/checksum.js';
import { openKeyring, unlockMasterKeys, type KeySlot } from '../src/codec/keys.js';
import {
  assertCliError,
  attachLoop,
  backupJson,
  differingBlocks,
  flipBit,
  initKeyFileRepo,
  initRepo,
  listFiles,
  listObjects,
  loopDevicesWork,
  makeImage,
  MiB,
  PASSPHRASE,
  readRange,
  repoState,
  run,
  runCli,
  runJson,
  runOk,
  runStatus,
  setByte,
  sha256File,
  tempDir,
  testIf,
  zeroFile,
  type Image,
  type RepoFixture,
  type VersionJson,
} from './helpers.js';

const BS = 4 * MiB;
const loopTest = testIf(loopDevicesWork());

/** The object path of each block of `img` in a key-file repository (computed with the repository's MAC key). */
async function objectPaths(repo: RepoFixture & { keyFile: string }, img: Image): Promise<(string | null)[]> {
  const slot = JSON.parse(await fs.readFile(path.join(repo.dir, 'keys', 'slot-1.json'), 'utf8')) as KeySlot;
  const [unlocked] = unlockMasterKeys([slot], 'keyfile', await fs.readFile(repo.keyFile));
  if (!unlocked) throw new Error('the key file does not unlock slot 1');
  const keyring = openKeyring(await fs.readFile(path.join(repo.dir, 'keys', 'keyring')), unlocked.masterKey!)!;
  const out: (string | null)[] = [];
  for (let i = 0; i < img.blockHashes.length; i++) {
    if (img.kinds[i] === 'zero') {
      out.push(null);
      continue;
    }
    const start = i * img.blockSize;
    const data = await readRange(img.path, start, Math.min(img.blockSize, img.size - start));
    const hex = blockChecksum(keyring.macKey, data).toString('hex');
    out.push(path.join(repo.dir, 'data', hex.slice(0, 2), hex));
  }
  return out;
}

// ------------------------------------------------------------------------------------------- keys

test('wrong passphrase: exit 1, a message about the passphrase, repository and target unchanged', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), { blocks: ['text'], tail: { bytes: 5000, kind: 'random' }, seed: 'wrongpass' });
  const repo = await initRepo(path.join(dir, 'repo'));
  const v = await backupJson(repo, img.path, 'vol');
  const before = await repoState(repo);
  const wrong = { BLOCKSAFE_PASSPHRASE: `${PASSPHRASE}!` };

  assertCliError(t, await runCli(['backup', ...repo.args, img.path, 'vol'], { env: wrong }), 1, /passphrase/i);
  const target = path.join(dir, 'out.img');
  assertCliError(t, await runCli(['restore', ...repo.args, v.id, target], { env: wrong }), 1, /passphrase/i);
  t.false(existsSync(target), 'no target was created');
  const passFile = path.join(dir, 'pass');
  await fs.writeFile(passFile, 'not it\n');
  assertCliError(t, await runCli(['ls', ...repo.args, '--passphrase-file', passFile]), 1, /passphrase/i);
  t.deepEqual(await repoState(repo), before);

  // The right passphrase from a file (trailing newline ignored) works.
  await fs.writeFile(passFile, `${PASSPHRASE}\n`);
  const listed = await runJson<VersionJson[]>(['ls', ...repo.args, '--passphrase-file', passFile]);
  t.deepEqual(
    listed.map((x) => x.id),
    [v.id],
  );
});

test('wrong or short key file: exit 1 / 2, repository unchanged', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const before = await repoState(repo);
  const other = path.join(dir, 'other.key');
  await fs.writeFile(other, randomBytes(64));
  assertCliError(t, await runCli(['ls', '--repo', repo.dir, '--key-file', other]), 1, /key file/i);
  const short = path.join(dir, 'short.key');
  await fs.writeFile(short, randomBytes(16));
  assertCliError(t, await runCli(['ls', '--repo', repo.dir, '--key-file', short]), 2, /too short/);
  assertCliError(t, await runCli(['ls', '--repo', repo.dir, '--key-file', path.join(dir, 'missing.key')]), 1, /does not exist/);
  t.deepEqual(await repoState(repo), before);
});

// ------------------------------------------------------------------------------------------- sources

test('missing source, directory source, unsupported scheme, bad volume name: clear errors, no version recorded', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const before = await repoState(repo);
  const missing = path.join(dir, 'no-such.img');
  assertCliError(t, await runCli(['backup', ...repo.args, missing, 'vol']), 1, /does not exist/);
  assertCliError(t, await runCli(['backup', ...repo.args, `file://${missing}`, 'vol']), 1, /does not exist/);
  assertCliError(t, await runCli(['backup', ...repo.args, dir, 'vol']), 2, /directory/);
  assertCliError(t, await runCli(['backup', ...repo.args, 'ftp://host/disk.img', 'vol']), 2, /ftp/);
  const img = path.join(dir, 'ok.img');
  await fs.writeFile(img, 'x');
  assertCliError(t, await runCli(['backup', ...repo.args, img, 'bad/name']), 2);
  t.deepEqual(await repoState(repo), before);
  t.deepEqual(await runJson(['ls', ...repo.args]), []);
});

// ------------------------------------------------------------------------------------------- versions

test('unknown version: exit 1 "No version", nothing created or removed', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const src = path.join(dir, 'src.img');
  await fs.writeFile(src, randomBytes(10_000));
  const v = await backupJson(repo, src, 'vol');
  const unknown = v.id.startsWith('z') ? 'yyyyyyyy' : 'zzzzzzzz';
  const before = await repoState(repo);
  assertCliError(t, await runCli(['show', unknown, ...repo.args]), 1, /No version/);
  const target = path.join(dir, 'out.img');
  assertCliError(t, await runCli(['restore', ...repo.args, unknown, target]), 1, /No version/);
  t.false(existsSync(target));
  assertCliError(t, await runCli(['rm', ...repo.args, v.id, unknown]), 1, /No version/);
  assertCliError(t, await runCli(['show', 'NOT-AN-ID', ...repo.args]), 2);
  t.deepEqual(await repoState(repo), before);
  t.is((await runJson<VersionJson[]>(['ls', ...repo.args])).length, 1, 'a typo in the second id removes nothing');
});

test('ambiguous version prefix: exit 2 naming the candidates, nothing changed', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const src = path.join(dir, 'src.img');
  await fs.writeFile(src, 'tiny');
  const ids: string[] = [];
  let pair: [string, string] | undefined;
  // 31 possible first characters: at most 32 versions until two share one (usually far fewer).
  while (!pair && ids.length < 32) {
    const id = (await backupJson(repo, src, 'vol')).id;
    const twin = ids.find((o) => o[0] === id[0]);
    if (twin) pair = [twin, id];
    ids.push(id);
  }
  t.truthy(pair);
  const prefix = pair![0][0]!;
  const before = await repoState(repo);
  const msg = assertCliError(t, await runCli(['show', prefix, ...repo.args]), 2, /ambiguous/);
  t.true(msg.includes(pair![0]) && msg.includes(pair![1]), msg);
  const target = path.join(dir, 'out.img');
  assertCliError(t, await runCli(['restore', ...repo.args, prefix, target]), 2, /ambiguous/);
  t.false(existsSync(target));
  assertCliError(t, await runCli(['rm', ...repo.args, prefix]), 2, /ambiguous/);
  t.deepEqual(await repoState(repo), before);
  t.is((await runJson<VersionJson[]>(['ls', ...repo.args])).length, ids.length);
});

// ------------------------------------------------------------------------------------------- targets

test('existing non-empty target: refused without --force (unchanged byte for byte), overwritten with --force', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), { blocks: ['random', 'zero', 'text'], tail: { bytes: 12_345, kind: 'text' }, seed: 'force' });
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const v = await backupJson(repo, img.path, 'vol');

  // Smaller existing file.
  const target = path.join(dir, 'existing.img');
  await fs.writeFile(target, randomBytes(MiB));
  const old = await sha256File(target);
  const oldStat = await fs.stat(target);
  assertCliError(t, await runCli(['restore', ...repo.args, v.id, target]), 1, /--force/);
  t.is(await sha256File(target), old);
  t.is((await fs.stat(target)).size, oldStat.size);
  t.is((await fs.stat(target)).mtimeMs, oldStat.mtimeMs);
  await runOk(['restore', ...repo.args, v.id, target, '--force']);
  t.is(await sha256File(target), img.sha256);

  // Larger existing file full of 0xff: with --force the version's bytes (zero block included) replace the
  // start of it; the rest is not the version's business.
  const larger = path.join(dir, 'larger.img');
  await fs.writeFile(larger, Buffer.alloc(img.size + MiB, 0xff));
  assertCliError(t, await runCli(['restore', ...repo.args, v.id, larger]), 1, /not empty/);
  t.deepEqual(await readRange(larger, 0, 16), Buffer.alloc(16, 0xff));
  await runOk(['restore', ...repo.args, v.id, larger, '--force']);
  t.is(await sha256File(larger, { start: 0, length: img.size }), img.sha256);
  t.deepEqual(await differingBlocks(larger, img), []);

  // An existing empty file is no data to lose: no --force needed.
  const empty = path.join(dir, 'empty.img');
  await fs.writeFile(empty, '');
  await runOk(['restore', ...repo.args, v.id, empty]);
  t.is(await sha256File(empty), img.sha256);

  // A directory is not a target.
  assertCliError(t, await runCli(['restore', ...repo.args, v.id, dir]), 2, /directory/);
});

test('a target in a directory that does not exist: exit 1 naming the missing directory, nothing created', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const src = path.join(dir, 'src.img');
  await fs.writeFile(src, randomBytes(5000));
  const v = await backupJson(repo, src, 'vol');
  const noDir = path.join(dir, 'no-such-dir', 'out.img');
  // Restore creates missing target files, so "Target … does not exist" would be misleading: the directory is missing.
  const msg = assertCliError(t, await runCli(['restore', ...repo.args, v.id, noDir]), 1, /director/i);
  t.true(msg.includes(path.dirname(noDir)), msg);
  t.false(existsSync(path.dirname(noDir)));
});

loopTest('block device targets: too small refused, non-empty refused without --force, mounted refused', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), { blocks: ['random', 'text'], tail: { bytes: 512 * 7, kind: 'text' }, seed: 'dev' });
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const v = await backupJson(repo, img.path, 'vol');
  const before = await repoState(repo);

  // Too small (and empty): refused, device still all zeros.
  const smallFile = path.join(dir, 'small.bin');
  await zeroFile(smallFile, 4 * MiB);
  const small = await attachLoop(t, smallFile);
  const zeros = await sha256File(small);
  assertCliError(t, await runCli(['restore', ...repo.args, v.id, small]), 1, /too small/);
  t.is(await sha256File(small), zeros);
  assertCliError(t, await runCli(['restore', ...repo.args, v.id, small, '--force']), 1, /too small/);
  t.is(await sha256File(small), zeros);

  // Big enough but holding data: refused without --force, unchanged; with --force restored.
  const fullFile = path.join(dir, 'full.bin');
  await fs.writeFile(fullFile, Buffer.alloc(12 * MiB, 0x5a));
  const full = await attachLoop(t, fullFile);
  const fullHash = await sha256File(full);
  assertCliError(t, await runCli(['restore', ...repo.args, v.id, full]), 1, /not empty/);
  t.is(await sha256File(full), fullHash);
  await runOk(['restore', ...repo.args, v.id, full, '--force']);
  t.is(await sha256File(full, { start: 0, length: img.size }), img.sha256);

  // Mounted: refused even with --force.
  const fsFile = path.join(dir, 'fs.bin');
  await zeroFile(fsFile, 16 * MiB);
  await run('mkfs.ext4', ['-q', '-F', fsFile]);
  const fsDev = await attachLoop(t, fsFile);
  const mnt = path.join(dir, 'mnt');
  await fs.mkdir(mnt);
  const mounted = (await runStatus('mount', ['-o', 'ro', fsDev, mnt])).code === 0;
  if (mounted) {
    t.teardown(async () => void (await runStatus('umount', [mnt]))); // runs before the loop device is detached
    const fsHash = await sha256File(fsDev);
    assertCliError(t, await runCli(['restore', ...repo.args, v.id, fsDev, '--force']), 1, /mounted/);
    t.is(await sha256File(fsDev), fsHash);
  } else {
    t.fail('mount does not work here, so the refusal of a mounted device cannot be checked');
  }
  t.deepEqual(await repoState(repo), before);
});

// ------------------------------------------------------------------------------------------- init

test('init refuses a non-empty directory, an existing repository and a bad block size', async (t) => {
  const dir = await tempDir(t);
  const busy = path.join(dir, 'busy');
  await fs.mkdir(busy);
  await fs.writeFile(path.join(busy, 'precious.txt'), 'keep me');
  assertCliError(t, await runCli(['init', '--repo', busy, '--encryption', 'none']), 2, /not empty/);
  t.deepEqual(await listFiles(busy), ['precious.txt']);

  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const before = await repoState(repo);
  assertCliError(t, await runCli(['init', ...repo.args]), 2, /already/);
  assertCliError(t, await runCli(['init', '--repo', repo.dir], { env: { BLOCKSAFE_PASSPHRASE: 'x' } }), 2, /already/);
  assertCliError(t, await runCli(['init', ...repo.args, '--encryption', 'none']), 2, /already/);
  t.deepEqual(await repoState(repo), before);

  const fresh = path.join(dir, 'fresh');
  assertCliError(t, await runCli(['init', '--repo', fresh, '--encryption', 'none', '--block-size', '3M']), 2, /power of two/);
  assertCliError(t, await runCli(['init', '--repo', fresh, '--encryption', 'rot13']), 2, /encryption/);
  t.false(existsSync(path.join(fresh, 'blocksafe.json')));
});

// ------------------------------------------------------------------------------------------- usage

test('usage errors exit 2: unknown command, missing argument, unknown option, no repository', async (t) => {
  for (const args of [['frobnicate'], ['backup', '--repo', '/tmp'], ['restore', '--repo', '/tmp', 'abc'], ['ls', '--no-such-option', '--repo', '/tmp']]) {
    const r = await runCli(args);
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.not(r.stderr.trim(), '', 'says what is wrong');
  }
  const dir = await tempDir(t);
  const src = path.join(dir, 'x.img');
  await fs.writeFile(src, 'x');
  assertCliError(t, await runCli(['ls']), 2, /--repo/);
  assertCliError(t, await runCli(['backup', src, 'vol']), 2, /--repo/);
});

test('usage errors are one line starting with "blocksafe: " like every other error', async (t) => {
  for (const args of [['frobnicate'], ['backup', '--repo', '/tmp'], ['ls', '--no-such-option', '--repo', '/tmp']]) {
    assertCliError(t, await runCli(args), 2);
  }
});

// ------------------------------------------------------------------------------------------- damage

test('damaged and missing block objects are detected on restore: exit 3, ranges named, the rest restored', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), {
    blocks: ['random', 'text', 'zero', 'random', 'text', 'random', 'text'],
    tail: { bytes: 100_000, kind: 'random' },
    seed: 'damage',
  });
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const v = await backupJson(repo, img.path, 'vol');
  const objs = await objectPaths(repo, img);
  t.deepEqual(
    [...(await listObjects(repo.dir))].sort(),
    objs
      .filter((o) => o !== null)
      .map((o) => path.relative(repo.dir, o!))
      .sort(),
  );

  // Block 1: one bit flipped inside the ciphertext; block 3: the header's format byte; blocks 5 and 6:
  // intact objects swapped (each under the other's name); tail: object gone. Blocks 0, 2 (zero) and 4 are fine.
  const size1 = (await fs.stat(objs[1]!)).size;
  await flipBit(objs[1]!, Math.floor(size1 / 2), 3);
  await setByte(objs[3]!, 4, 2);
  const [five, six] = [await fs.readFile(objs[5]!), await fs.readFile(objs[6]!)];
  await fs.writeFile(objs[5]!, six);
  await fs.writeFile(objs[6]!, five);
  await fs.rm(objs[7]!);
  const expected = [
    { offset: 1 * BS, length: BS },
    { offset: 3 * BS, length: BS },
    { offset: 5 * BS, length: BS },
    { offset: 6 * BS, length: BS },
    { offset: 7 * BS, length: 100_000 },
  ];
  const damagedBlocks = [1, 3, 5, 6, 7];

  const out = path.join(dir, 'out.img');
  const r = await runCli(['restore', ...repo.args, v.id, out]);
  t.is(r.code, 3, r.stderr);
  for (const d of expected) t.true(r.stderr.includes(`offset ${d.offset} length ${d.length}`), `stderr names ${d.offset}+${d.length}:\n${r.stderr}`);
  t.regex(r.stderr, /DAMAGED/);
  t.is((await fs.stat(out)).size, img.size);
  t.deepEqual(await differingBlocks(out, img), damagedBlocks, 'every undamaged block restored exactly');
  for (const d of expected)
    t.true(
      (await readRange(out, d.offset, d.length)).every((b) => b === 0),
      'damaged ranges left unwritten',
    );

  const out2 = path.join(dir, 'out2.img');
  const j = await runCli(['restore', ...repo.args, v.id, out2, '--json']);
  t.is(j.code, 3, j.stderr);
  const result = JSON.parse(j.stdout);
  t.is(result.version, v.id);
  t.deepEqual(
    result.damaged.map((d: { offset: number; length: number }) => ({ offset: d.offset, length: d.length })),
    expected,
  );
  t.regex(result.damaged[4].reason, /missing/);
  for (const d of result.damaged) t.regex(d.reason, /damaged|missing/);
  t.deepEqual(await differingBlocks(out2, img), damagedBlocks);
});

test('a flipped byte in an unencrypted object is caught by the recomputed checksum', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), { blocks: ['random', 'random'], seed: 'plain-damage' });
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const v = await backupJson(repo, img.path, 'vol');
  const objects = await listObjects(repo.dir);
  t.is(objects.length, 2);
  // Random data is stored uncompressed: flipping a payload byte leaves a well-formed object.
  const victim = path.join(repo.dir, objects[0]!);
  await flipBit(victim, 12 + 1000, 0);
  const out = path.join(dir, 'out.img');
  const r = await runCli(['restore', ...repo.args, v.id, out, '--json']);
  t.is(r.code, 3, r.stderr);
  const result = JSON.parse(r.stdout);
  t.is(result.damaged.length, 1);
  t.is(result.damaged[0].length, BS);
  t.regex(result.damaged[0].reason, /checksum/);
  const bad = result.damaged[0].offset / BS;
  t.deepEqual(await differingBlocks(out, img), [bad]);
});
