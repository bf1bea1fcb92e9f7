/**
 * rbd:// sources and targets against the real single-node Ceph cluster that the S3 tests use
 * (BLOCKSAFE_TEST_RGW_DIR/ceph.conf, pool `rbd`). Images hold a real ext4 filesystem (mkfs.ext4 -d on a
 * local file, `rbd import`); changes are made to the local copy with debugfs and sent to the image as an
 * rbd diff stream (`rbd import-diff`), discards included, so the expected image is always known exactly.
 */
import test, { type ExecutionContext } from 'ava';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { assertCliError, initKeyFileRepo, run, runCli, runJson, runOk, sha256, type RepoFixture, type VersionJson } from './helpers.js';
import { fastTempDir, killOnTeardown, pausePoints, spawnCli, waitFor } from './cliHarness.js';

const DIR = process.env.BLOCKSAFE_TEST_RGW_DIR ?? '/tmp/blocksafe-test-rgw';
const CONF = path.join(DIR, 'ceph.conf');
const POOL = 'rbd';
const MiB = 2 ** 20;
const SIZE = 48 * MiB;
const BS = 4 * MiB;

function clusterUp(): string | null {
  if (spawnSync('sh', ['-c', 'command -v rbd && command -v mkfs.ext4 && command -v debugfs && command -v e2fsck'], { stdio: 'ignore' }).status !== 0) return 'rbd or e2fsprogs missing';
  const r = spawnSync('rbd', ['-c', CONF, '--client_mount_timeout', '10', 'ls', POOL], { stdio: 'ignore', timeout: 30_000 });
  return r.status === 0 ? null : `no Ceph cluster with pool "${POOL}" at ${CONF}`;
}
const missing = clusterUp();
const rbdTest = missing && process.env.CI !== 'true' ? test.skip : test.serial;
if (missing && process.env.CI === 'true') test('Ceph RBD cluster available', (t) => t.fail(missing));

async function rbd(...args: string[]): Promise<string> {
  return (await run('rbd', ['-c', CONF, ...args])).stdout;
}

/** A fresh image name, removed (snapshots included, protected ones unprotected) when the test ends. */
function imageName(t: ExecutionContext, stem: string): string {
  const name = `bstest-${stem}-${randomBytes(4).toString('hex')}`;
  t.teardown(async () => {
    try {
      const snaps = JSON.parse(await rbd('snap', 'ls', '--format', 'json', `${POOL}/${name}`)) as { name: string; protected: string }[];
      for (const s of snaps) if (s.protected === 'true') await rbd('snap', 'unprotect', `${POOL}/${name}@${s.name}`);
      await rbd('snap', 'purge', '--no-progress', `${POOL}/${name}`);
      await rbd('rm', '--no-progress', `${POOL}/${name}`);
    } catch {
      /* not created */
    }
  });
  return name;
}

async function snapNames(image: string): Promise<string[]> {
  return (JSON.parse(await rbd('snap', 'ls', '--format', 'json', `${POOL}/${image}`)) as { name: string }[]).map((s) => s.name);
}

async function exportImage(dir: string, spec: string): Promise<Buffer> {
  const file = path.join(dir, `export-${randomBytes(4).toString('hex')}.img`);
  await rbd('export', '--no-progress', spec, file);
  const b = await fs.readFile(file);
  await fs.rm(file);
  return b;
}

/** A 48 MiB ext4 filesystem holding random files, as a local file. */
async function makeFs(dir: string): Promise<string> {
  const src = path.join(dir, 'content');
  await fs.mkdir(path.join(src, 'sub'), { recursive: true });
  await fs.writeFile(path.join(src, 'a.bin'), randomBytes(3 * MiB));
  await fs.writeFile(path.join(src, 'b.bin'), randomBytes(1.5 * MiB));
  await fs.writeFile(path.join(src, 'c.bin'), randomBytes(12 * 1024));
  await fs.writeFile(path.join(src, 'sub', 'd.txt'), 'hello from blocksafe\n'.repeat(500));
  const img = path.join(dir, 'fs.img');
  await fs.writeFile(img, Buffer.alloc(0));
  await fs.truncate(img, SIZE);
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'nodiscard', '-d', src, img]);
  return img;
}

/** The 4K filesystem blocks of a file, from debugfs. */
async function fsBlocks(img: string, file: string): Promise<number[]> {
  const out = (await run('debugfs', ['-R', `blocks ${file}`, img])).stdout;
  return out.trim().split(/\s+/).filter(Boolean).map(Number);
}

/**
 * Changes the filesystem like a running system would: writes a new file, removes `remove` and discards its
 * blocks (as fstrim would). Returns the new image bytes.
 */
async function changeFs(dir: string, img: string, newFile: string, newSize: number, remove: string): Promise<Buffer> {
  const host = path.join(dir, `${newFile}.src`);
  await fs.writeFile(host, randomBytes(newSize));
  const freed = await fsBlocks(img, `/${remove}`);
  if (freed.length === 0) throw new Error(`no blocks for ${remove}`);
  await run('debugfs', ['-w', '-R', `write ${host} ${newFile}`, img]);
  await run('debugfs', ['-w', '-R', `rm ${remove}`, img]);
  const fh = await fs.open(img, 'r+');
  try {
    for (const b of freed) await fh.write(Buffer.alloc(4096), 0, 4096, b * 4096);
  } finally {
    await fh.close();
  }
  return fs.readFile(img);
}

/** Sends the differences between two versions of the image to RBD: 'w' for changed pages, 'z' (discard) for zeroed ones. */
async function pushChanges(dir: string, image: string, before: Buffer, after: Buffer): Promise<void> {
  const parts: Buffer[] = [Buffer.from('rbd diff v1\n'), record('s', [after.length])];
  const zero = Buffer.alloc(4096);
  for (let off = 0; off < after.length; off += 4096) {
    const page = after.subarray(off, off + 4096);
    if (page.equals(before.subarray(off, off + 4096))) continue;
    if (page.equals(zero)) parts.push(record('z', [off, 4096]));
    else parts.push(record('w', [off, 4096]), page);
  }
  parts.push(Buffer.from('e'));
  const file = path.join(dir, `change-${randomBytes(4).toString('hex')}.diff`);
  await fs.writeFile(file, Buffer.concat(parts));
  await rbd('import-diff', '--no-progress', file, `${POOL}/${image}`);
}

function record(tag: string, nums: number[]): Buffer {
  const b = Buffer.alloc(1 + 8 * nums.length);
  b.write(tag, 0, 'latin1');
  nums.forEach((n, i) => b.writeBigUInt64LE(BigInt(n), 1 + 8 * i));
  return b;
}

/** Blocks (of BS) that differ, and which of those are non-zero afterwards. */
function changedBlocks(before: Buffer, after: Buffer): { changed: number[]; nonZeroChanged: number; nonZeroUnchanged: number } {
  const changed: number[] = [];
  let nonZeroChanged = 0;
  let nonZeroUnchanged = 0;
  for (let b = 0; b * BS < after.length; b++) {
    const x = after.subarray(b * BS, (b + 1) * BS);
    const nz = x.some((v) => v !== 0);
    if (x.equals(before.subarray(b * BS, (b + 1) * BS))) {
      if (nz) nonZeroUnchanged++;
    } else {
      changed.push(b);
      if (nz) nonZeroChanged++;
    }
  }
  return { changed, nonZeroChanged, nonZeroUnchanged };
}

function nonZeroBlockCount(buf: Buffer, bs = BS): number {
  let n = 0;
  for (let b = 0; b * bs < buf.length; b++) if (buf.subarray(b * bs, (b + 1) * bs).some((v) => v !== 0)) n++;
  return n;
}

async function fsck(dir: string, data: Buffer): Promise<void> {
  const file = path.join(dir, `fsck-${randomBytes(4).toString('hex')}.img`);
  await fs.writeFile(file, data);
  await run('e2fsck', ['-fn', file]);
  await fs.rm(file);
}

interface Setup {
  dir: string;
  repo: RepoFixture;
  env: Record<string, string>;
  img: string;
  image: string;
}

async function setup(t: ExecutionContext, blockSize?: string): Promise<Setup> {
  const dir = await fastTempDir(t, 'blocksafe-rbd-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), blockSize ? { blockSize } : {});
  const env = { ...repo.env, CEPH_CONF: CONF };
  const img = await makeFs(dir);
  const image = imageName(t, 'src');
  await rbd('import', '--no-progress', img, `${POOL}/${image}`);
  return { dir, repo, env, img, image };
}

function backup(s: Setup, uri: string, name: string, extra: string[] = []): Promise<VersionJson & { stats: Record<string, number> }> {
  return runJson(['backup', ...s.repo.args, uri, name, ...extra], { env: s.env });
}

rbdTest('full and incremental backups of rbd://POOL/IMAGE read only changed blocks, rotate snapshots and restore byte-identical', async (t) => {
  const s = await setup(t);
  let local: Buffer = await fs.readFile(s.img);
  await rbd('snap', 'create', '--no-progress', `${POOL}/${s.image}@users-own`);
  // A snapshot with blocksafe's naming pattern that is protected: rotation must leave it.
  await rbd('snap', 'create', '--no-progress', `${POOL}/${s.image}@blocksafe-manual`);
  await rbd('snap', 'protect', `${POOL}/${s.image}@blocksafe-manual`);
  // Another repository's snapshot of the same image: not this chain's, so it stays.
  await rbd('snap', 'create', '--no-progress', `${POOL}/${s.image}@blocksafe-otherrepo1`);

  const v1 = await backup(s, `rbd://${POOL}/${s.image}`, 'vm1');
  t.is(v1.source, `rbd://${POOL}/${s.image}`);
  t.is(v1.snapshot_name, `blocksafe-${v1.id}`);
  t.is(v1.size, SIZE);
  t.is(v1.stats.blocks_read, nonZeroBlockCount(local), 'a full read reads exactly the allocated blocks');

  const restored1 = imageName(t, 'r1');
  await runOk(['restore', ...s.repo.args, v1.id, `rbd://${POOL}/${restored1}`], { env: s.env });
  const r1 = await exportImage(s.dir, `${POOL}/${restored1}`);
  t.is(sha256(r1), sha256(local), 'full backup restores byte-identical');

  // Night 2: a new file, a removed (and discarded) 12 KiB file: a sub-block discard.
  const before2 = local;
  local = await changeFs(s.dir, s.img, 'new1.bin', 700 * 1024, 'c.bin');
  await pushChanges(s.dir, s.image, before2, local);
  const c2 = changedBlocks(before2, local);
  t.true(c2.changed.length >= 1 && c2.changed.length < 12, `scattered change (${c2.changed.join(',')})`);
  const v2 = await backup(s, `rbd://${POOL}/${s.image}`, 'vm1');
  t.is(v2.base, v1.id);
  t.is(v2.stats.blocks_read, c2.nonZeroChanged, 'only the changed blocks are read');
  t.is(v2.stats.blocks_referenced, c2.nonZeroUnchanged, 'unchanged blocks are taken from the base');

  // Night 3: another file, and a 3 MiB file removed and discarded (spans whole pages across blocks).
  const before3 = local;
  local = await changeFs(s.dir, s.img, 'new2.bin', 300 * 1024, 'a.bin');
  await pushChanges(s.dir, s.image, before3, local);
  const c3 = changedBlocks(before3, local);
  const v3 = await backup(s, `rbd://${POOL}/${s.image}`, 'vm1');
  t.is(v3.base, v2.id);
  t.is(v3.stats.blocks_read, c3.nonZeroChanged);
  t.is(v3.stats.blocks_referenced, c3.nonZeroUnchanged);

  const snaps = await snapNames(s.image);
  t.deepEqual(
    snaps.filter((n) => n.startsWith('blocksafe-') && n !== 'blocksafe-manual' && n !== 'blocksafe-otherrepo1'),
    [`blocksafe-${v3.id}`],
    'exactly one blocksafe snapshot of this chain is kept',
  );
  t.true(snaps.includes('blocksafe-otherrepo1'), "another repository's snapshot is never removed");
  t.true(snaps.includes('users-own'), "the user's snapshot is never removed");
  t.true(snaps.includes('blocksafe-manual'), 'a protected snapshot is never removed');

  // Each version restores byte-identical; the filesystem checks clean.
  const r3name = imageName(t, 'r3');
  await runOk(['restore', ...s.repo.args, v3.id, `rbd://${POOL}/${r3name}`], { env: s.env });
  const r3 = await exportImage(s.dir, `${POOL}/${r3name}`);
  t.is(sha256(r3), sha256(local), 'v3 restores byte-identical');
  await fsck(s.dir, r3);
  const du = JSON.parse(await rbd('du', '--format', 'json', `${POOL}/${r3name}`)) as { images: { used_size: number }[] };
  t.true(du.images[0]!.used_size <= (nonZeroBlockCount(local) + 1) * BS, `restored image is sparse (used ${du.images[0]!.used_size})`);

  // Over an existing image: refused without --force (image untouched), then --force with v2.
  const refused = await runCli(['restore', ...s.repo.args, v2.id, `rbd://${POOL}/${r3name}`], { env: s.env });
  assertCliError(t, refused, 1, /exists .*Use --force/);
  t.is(sha256(await exportImage(s.dir, `${POOL}/${r3name}`)), sha256(local), 'the refused restore wrote nothing');
  await runOk(['restore', ...s.repo.args, v2.id, `rbd://${POOL}/${r3name}`, '--force'], { env: s.env });
  const r2 = await exportImage(s.dir, `${POOL}/${r3name}`);
  t.is(sha256(r2), sha256(before3), 'restore --force over an existing image gives exactly v2 (discards included)');
  await fsck(s.dir, r2);

  // ls shows the source.
  const ls = await runJson<{ id: string; source: string }[]>(['ls', ...s.repo.args, 'vm1', '--json'], { env: s.env });
  t.true(ls.every((v) => v.source === `rbd://${POOL}/${s.image}`));
});

rbdTest('a user snapshot rbd://POOL/IMAGE@SNAP is read and left alone; a missing base snapshot gives a full read with a note', async (t) => {
  const s = await setup(t);
  const local = await fs.readFile(s.img);
  await rbd('snap', 'create', '--no-progress', `${POOL}/${s.image}@night1`);
  const v1 = await backup(s, `rbd://${POOL}/${s.image}@night1`, 'vm2');
  t.is(v1.snapshot_name, 'night1');
  const changed = await changeFs(s.dir, s.img, 'x.bin', 100 * 1024, 'c.bin');
  await pushChanges(s.dir, s.image, local, changed);
  await rbd('snap', 'create', '--no-progress', `${POOL}/${s.image}@night2`);
  const v2 = await backup(s, `rbd://${POOL}/${s.image}@night2`, 'vm2');
  t.is(v2.base, v1.id, 'incremental from the previous user snapshot');
  t.is(v2.stats.blocks_read, changedBlocks(local, changed).nonZeroChanged);
  t.deepEqual((await snapNames(s.image)).sort(), ['night1', 'night2'], 'user snapshots are not rotated');

  await rbd('snap', 'rm', '--no-progress', `${POOL}/${s.image}@night2`);
  await rbd('snap', 'create', '--no-progress', `${POOL}/${s.image}@night3`);
  const r = await runCli(['backup', ...s.repo.args, `rbd://${POOL}/${s.image}@night3`, 'vm2', '--json'], { env: s.env });
  t.is(r.code, 0, r.stderr);
  t.regex(r.stderr, /note: reading all of .*night2 no longer exists/);
  const v3 = JSON.parse(r.stdout) as VersionJson & { stats: Record<string, number> };
  t.is(v3.base, null);
  t.is(v3.stats.blocks_read, nonZeroBlockCount(changed));
  // Deep scrub against the snapshot: equal; against the head after a change: the changed block is found.
  const ok = await runCli(['scrub', ...s.repo.args, v3.id, '--source', `rbd://${POOL}/${s.image}@night3`], { env: s.env });
  t.is(ok.code, 0, ok.stderr);
  t.regex(ok.stdout + ok.stderr, /equals the live source/);
  const tampered = Buffer.from(changed);
  tampered.fill(0x5a, 17 * MiB, 17 * MiB + 4096);
  await pushChanges(s.dir, s.image, changed, tampered);
  const scrub = await runJson<{ source_differences: { block: number }[] }>(['scrub', ...s.repo.args, v3.id, '--source', `rbd://${POOL}/${s.image}`, '--json'], { env: s.env });
  t.deepEqual(
    scrub.source_differences.map((d) => d.block),
    [Math.floor((17 * MiB) / BS)],
  );
});

rbdTest('namespaces: rbd://POOL/NAMESPACE/IMAGE backs up and restores byte-identical', async (t) => {
  const dir = await fastTempDir(t, 'blocksafe-rbd-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const env = { ...repo.env, CEPH_CONF: CONF };
  const ns = `bstest-ns-${randomBytes(4).toString('hex')}`;
  await rbd('namespace', 'create', `${POOL}/${ns}`);
  t.teardown(async () => {
    for (const img of ['a', 'b']) {
      await rbd('snap', 'purge', '--no-progress', `${POOL}/${ns}/${img}`).catch(() => undefined);
      await rbd('rm', '--no-progress', `${POOL}/${ns}/${img}`).catch(() => undefined);
    }
    await rbd('namespace', 'rm', `${POOL}/${ns}`).catch(() => undefined);
  });
  const img = await makeFs(dir);
  await rbd('import', '--no-progress', img, `${POOL}/${ns}/a`);
  const v = await runJson<VersionJson>(['backup', ...repo.args, `rbd://${POOL}/${ns}/a`, 'nsvm', '--json'], { env });
  t.is(v.source, `rbd://${POOL}/${ns}/a`);
  await runOk(['restore', ...repo.args, v.id, `rbd://${POOL}/${ns}/b`], { env });
  t.is(sha256(await exportImage(dir, `${POOL}/${ns}/b`)), sha256(await fs.readFile(img)));
});

rbdTest('restore refuses an image with a watcher even with --force, and leaves it alone', async (t) => {
  const s = await setup(t);
  const local = await fs.readFile(s.img);
  const v = await backup(s, `rbd://${POOL}/${s.image}`, 'vm3');
  const target = imageName(t, 'watched');
  await rbd('create', '--size', '8M', `${POOL}/${target}`);
  // rbd watch runs until a line arrives on stdin: keep stdin open.
  const watcher = spawn('rbd', ['-c', CONF, 'watch', `${POOL}/${target}`], { stdio: ['pipe', 'ignore', 'ignore'] });
  t.teardown(() => {
    watcher.kill('SIGKILL');
  });
  await waitFor('the watcher', async () => ((JSON.parse(await rbd('status', '--format', 'json', `${POOL}/${target}`)) as { watchers: unknown[] }).watchers.length > 0 ? true : undefined));
  const r = await runCli(['restore', ...s.repo.args, v.id, `rbd://${POOL}/${target}`, '--force'], { env: s.env });
  assertCliError(t, r, 1, /is in use \(watched by .*--force does not override/);
  const info = JSON.parse(await rbd('info', '--format', 'json', `${POOL}/${target}`)) as { size: number };
  t.is(info.size, 8 * MiB, 'the watched image was not resized');
  t.true(
    (await exportImage(s.dir, `${POOL}/${target}`)).every((b) => b === 0),
    'nothing was written',
  );
  watcher.stdin!.end('\n'); // a clean unwatch (a killed watcher lingers until its timeout)
  await waitFor(
    'the watcher to go',
    async () => ((JSON.parse(await rbd('status', '--format', 'json', `${POOL}/${target}`)) as { watchers: unknown[] }).watchers.length === 0 ? true : undefined),
    120_000,
    200,
  );
  await runOk(['restore', ...s.repo.args, v.id, `rbd://${POOL}/${target}`, '--force'], { env: s.env });
  t.is(sha256(await exportImage(s.dir, `${POOL}/${target}`)), sha256(local));
});

rbdTest('kill -9 during an rbd backup and an rbd restore: --resume finishes both byte-identical', async (t) => {
  const s = await setup(t, '64K'); // small blocks: many commits and import-diff segments in 48 MiB
  const local = await fs.readFile(s.img);
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['backup', ...s.repo.args, `rbd://${POOL}/${s.image}`, 'vm4'], { ...s.env, ...pause.env('writer.commit#2') }));
  t.true(await pause.reached('writer.commit#2', bg), bg.stderr());
  t.is((await bg.kill9()).signal, 'SIGKILL');
  const interrupted = (await runJson<{ id: string; complete: boolean; snapshot_name: string; blocks_done: number }[]>(['ls', ...s.repo.args, 'vm4', '--json'], { env: s.env }))[0]!;
  t.false(interrupted.complete);
  t.true((await snapNames(s.image)).includes(interrupted.snapshot_name), 'the snapshot of the interrupted backup is kept for --resume');
  const v = await backup(s, `rbd://${POOL}/${s.image}`, 'vm4', ['--resume']);
  t.is(v.id, interrupted.id);
  t.true(interrupted.blocks_done > 0);
  // Statistics add up over both runs: had the resumed run read committed blocks again, they would count twice.
  t.is(v.stats.blocks_read, nonZeroBlockCount(local, 64 * 1024), 'every allocated block read exactly once over both runs');

  const target = imageName(t, 'resumed');
  const rbg = killOnTeardown(t, spawnCli(['restore', ...s.repo.args, v.id, `rbd://${POOL}/${target}`], { ...s.env, ...pause.env('restore.checkpoint#2') }));
  t.true(await pause.reached('restore.checkpoint#2', rbg), rbg.stderr());
  t.is((await rbg.kill9()).signal, 'SIGKILL');
  const plain = await runCli(['restore', ...s.repo.args, v.id, `rbd://${POOL}/${target}`], { env: s.env });
  assertCliError(t, plain, 1, /was interrupted; continue it with --resume/);
  const resumed = await runJson<{ bytes_written: number }>(['restore', ...s.repo.args, v.id, `rbd://${POOL}/${target}`, '--resume', '--json'], { env: s.env });
  t.true(resumed.bytes_written < nonZeroBlockCount(local, 64 * 1024) * 64 * 1024, 'the checkpointed segments were not written again');
  t.is(sha256(await exportImage(s.dir, `${POOL}/${target}`)), sha256(local));
});

rbdTest('wrong pool, wrong image and an unreachable cluster are each one clear line; nothing is recorded', async (t) => {
  const dir = await fastTempDir(t, 'blocksafe-rbd-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const env = { ...repo.env, CEPH_CONF: CONF };
  assertCliError(t, await runCli(['backup', ...repo.args, 'rbd://no-such-pool/img', 'x'], { env }), 1, /Ceph pool "no-such-pool" does not exist/);
  assertCliError(t, await runCli(['backup', ...repo.args, `rbd://${POOL}/no-such-image`, 'x'], { env }), 1, /RBD image "rbd\/no-such-image" does not exist/);
  assertCliError(t, await runCli(['backup', ...repo.args, `rbd://${POOL}/no-such-ns/img`, 'x'], { env }), 1, /RBD namespace "rbd\/no-such-ns" does not exist/);
  assertCliError(t, await runCli(['backup', ...repo.args, 'rbd://bad pool/x', 'x'], { env }), 2, /valid pool/);
  const bad = path.join(dir, 'unreachable.conf');
  await fs.writeFile(bad, '[global]\nmon host = 127.0.0.1:1\nauth client required = none\n');
  const conf = path.join(dir, 'appliance.conf');
  await fs.writeFile(conf, `[ceph]\nconf = ${bad}\ntimeout = 3s\n`);
  assertCliError(t, await runCli(['--config', conf, 'backup', ...repo.args, `rbd://${POOL}/img`, 'x'], { env }), 1, /Ceph cluster is unreachable \(no monitor answered within 3 s/);
  t.deepEqual(await runJson(['ls', ...repo.args, '--json'], { env }), [], 'no version was recorded');
});

test('rbd runs without blocksafe secrets in its environment, with CEPH_ARGS and the [ceph] settings as arguments', async (t) => {
  const dir = await fastTempDir(t, 'blocksafe-rbd-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const bin = path.join(dir, 'bin');
  await fs.mkdir(bin);
  const dump = path.join(dir, 'rbd-env');
  // A stand-in rbd that records what it got and fails like a missing pool.
  await fs.writeFile(path.join(bin, 'rbd'), `#!/bin/sh\nenv > ${dump}\necho "$@" > ${dump}.args\necho "rbd: error opening pool 'p': (2) No such file or directory" >&2\nexit 2\n`, { mode: 0o755 });
  const conf = path.join(dir, 'appliance.conf');
  await fs.writeFile(conf, '[ceph]\nconf = /etc/ceph/other.conf\nid = client.backup\nkeyring = /etc/ceph/backup.keyring\ncluster = other\ntimeout = 7s\n');
  const r = await runCli(['--config', conf, 'backup', ...repo.args, 'rbd://p/img', 'x'], {
    env: { ...repo.env, PATH: `${bin}:${process.env.PATH}`, BLOCKSAFE_PASSPHRASE: 'secret-pass', AWS_SECRET_ACCESS_KEY: 'secret-key', CEPH_ARGS: '--name client.x' },
  });
  assertCliError(t, r, 1, /Ceph pool "p" does not exist/);
  const env = await fs.readFile(dump, 'utf8');
  t.false(env.includes('secret-pass'));
  t.false(env.includes('secret-key'));
  t.true(env.includes('CEPH_ARGS=--name client.x'));
  t.is(
    (await fs.readFile(`${dump}.args`, 'utf8')).trim(),
    '--cluster other --conf /etc/ceph/other.conf --keyring /etc/ceph/backup.keyring --id backup --client_mount_timeout 7 info --format json p/img',
  );
});
