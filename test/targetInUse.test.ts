/**
 * A restore never writes to a target in use (src/engine/targetInUse.ts), with or without --force: the
 * backing file of a mounted loop device (by its path and through a hard link), the mounted loop device
 * itself, a disk whose partition is mounted, a device held by device-mapper, a swap file in use, a file open
 * for writing by another process. Real loop devices, ext4 and dm; each refusal is one line naming the user,
 * exit code 1, and the target's bytes are unchanged (sha256 before and after). What is free is still
 * restored.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { targetUsers } from '../src/engine/targetInUse.js';
import { assertCliError, attachLoop, backupJson, haveCommand, initKeyFileRepo, loopDevicesWork, makeImage, MiB, run, runCli, runStatus, sha256File, tempDir, type RepoFixture } from './helpers.js';

const why = !loopDevicesWork()
  ? 'loop devices cannot be attached here (needs root and losetup)'
  : ['mkfs.ext4', 'mount', 'umount', 'dmsetup', 'parted', 'mkswap', 'swapon'].find((c) => !haveCommand(c));
// Under CI a missing tool or privilege is a failure, not a skip.
const loopTest = why && process.env.CI !== 'true' ? test.serial.skip : test.serial;
if (why) {
  if (process.env.CI === 'true') test.serial(`in-use targets cannot be checked: ${why}`, (t) => t.fail(`needed in CI: ${why}`));
  else test.serial.skip(`in-use targets skipped: ${why}`, () => undefined);
}

async function fixture(t: ExecutionContext): Promise<{ dir: string; repo: RepoFixture; versionId: string }> {
  const dir = await tempDir(t, 'blocksafe-inuse-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'v.img'), { blockSize: MiB, seed: 'inuse', blocks: ['random', 'text', 'random', 'zero'] });
  const v = await backupJson(repo, image.path, 'vol');
  return { dir, repo, versionId: v.id };
}

/** A file of `size` bytes with an ext4 filesystem, attached to a loop device and mounted. */
async function mountedImage(t: ExecutionContext, dir: string, size: number): Promise<{ file: string; dev: string; mnt: string }> {
  const file = path.join(dir, 'mnt.img');
  await fs.writeFile(file, Buffer.alloc(0));
  await fs.truncate(file, size);
  await run('mkfs.ext4', ['-q', '-F', file]);
  const dev = await attachLoop(t, file);
  const mnt = path.join(dir, 'mnt');
  await fs.mkdir(mnt);
  await run('mount', [dev, mnt]);
  t.teardown(() => runStatus('umount', [mnt]));
  await fs.writeFile(path.join(mnt, 'live.txt'), 'data in use\n');
  return { file, dev, mnt };
}

async function restoreRefused(t: ExecutionContext, repo: RepoFixture, versionId: string, target: string, pattern: RegExp): Promise<void> {
  const before = await sha256File(target);
  const r = await runCli(['restore', ...repo.args, '--force', versionId, target], { env: repo.env });
  assertCliError(t, r, 1, pattern);
  t.is(await sha256File(target), before, `${target} is untouched`);
}

loopTest('the backing file of a mounted loop device is refused (path, hard link), and so is the device', async (t) => {
  const { dir, repo, versionId } = await fixture(t);
  const { file, dev, mnt } = await mountedImage(t, dir, 16 * MiB);
  const loop = dev.replace('/dev/', '');
  const said = new RegExp(`Target .* is in use: it backs loop device /dev/${loop} \\(mounted on ${mnt}\\)\\. Nothing was written`);
  await restoreRefused(t, repo, versionId, file, said);
  // Another name for the same file: compared by device and inode, not by path.
  const link = path.join(dir, 'other-name.img');
  await fs.link(file, link);
  await restoreRefused(t, repo, versionId, link, said);
  await restoreRefused(t, repo, versionId, dev, new RegExp(`Target ${dev} is in use: mounted on ${mnt}`));
  // The filesystem is intact and still mounted.
  t.is(await fs.readFile(path.join(mnt, 'live.txt'), 'utf8'), 'data in use\n');
  // Once unmounted and detached, the same file is a valid target again.
  await run('umount', [mnt]);
  await run('losetup', ['-d', dev]);
  const r = await runCli(['restore', ...repo.args, '--force', versionId, file], { env: repo.env });
  t.is(r.code, 0, r.stderr);
});

loopTest('a disk with a mounted partition is refused', async (t) => {
  const { dir, repo, versionId } = await fixture(t);
  // A partitioned disk (loop with partition scanning), its first partition mounted.
  const disk = path.join(dir, 'disk.img');
  await fs.writeFile(disk, Buffer.alloc(0));
  await fs.truncate(disk, 32 * MiB);
  await run('parted', ['-s', disk, 'mklabel', 'gpt', 'mkpart', 'p1', 'ext4', '1MiB', '20MiB']);
  const { stdout } = await run('losetup', ['-f', '-P', '--show', disk]);
  const dev = stdout.trim();
  t.teardown(() => runStatus('losetup', ['-d', dev]));
  const partName = `${path.basename(dev)}p1`;
  // The kernel announces the partition in /sys asynchronously: poll for it (10 s at most). Without udev (a
  // container) no /dev node appears, so one is made from its device number.
  const sysDev = `/sys/block/${path.basename(dev)}/${partName}/dev`;
  for (let i = 0; i < 200 && !(await fs.stat(sysDev).catch(() => null)); i++) {
    if (i % 20 === 10) await runStatus('partx', ['-a', dev]); // asks the kernel to read the table again
    await new Promise((r) => setTimeout(r, 50));
  }
  let part = `/dev/${partName}`;
  if (!(await fs.stat(part).catch(() => null))) {
    const [major, minor] = (await fs.readFile(sysDev, 'utf8')).trim().split(':');
    part = path.join(dir, partName);
    await run('mknod', [part, 'b', major!, minor!]);
  }
  await run('mkfs.ext4', ['-q', '-F', part]);
  const mnt = path.join(dir, 'pmnt');
  await fs.mkdir(mnt);
  await run('mount', [part, mnt]);
  t.teardown(() => runStatus('umount', [mnt]));
  await restoreRefused(t, repo, versionId, dev, new RegExp(`Target ${dev} is in use: its partition ${partName} is mounted on ${mnt}\\.`));
});

loopTest('an active swap file and a file open for writing by another process are refused; readers are not', async (t) => {
  const { dir, repo, versionId } = await fixture(t);
  const swap = path.join(dir, 'swapfile');
  await fs.writeFile(swap, Buffer.alloc(8 * MiB));
  await fs.chmod(swap, 0o600);
  await run('mkswap', [swap]);
  const on = await runStatus('swapon', [swap]);
  if (on.code === 0) {
    t.teardown(() => runStatus('swapoff', [swap]));
    await restoreRefused(t, repo, versionId, swap, /is in use: it is an active swap file/);
  } else if (process.env.CI === 'true') t.fail(`swapon failed in CI: ${on.stderr}`);
  else t.log(`swapon not permitted here (${on.stderr.trim()}); the swap case is not checked`);

  const busy = path.join(dir, 'vm-disk.img');
  await fs.writeFile(busy, Buffer.alloc(4 * MiB, 7));
  // A process holding the file open for writing (as a running VM holds its disk image).
  const writer = spawn('sh', ['-c', `exec 3>>"${busy}"; echo ready; exec sleep 600`], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.teardown(() => writer.kill('SIGKILL'));
  await new Promise<void>((resolve) => writer.stdout.once('data', () => resolve()));
  await restoreRefused(t, repo, versionId, busy, new RegExp(`is in use: open for writing by process ${writer.pid} \\(sleep\\)`));
  writer.kill('SIGKILL');
  await new Promise((r) => writer.once('close', r));

  // A reader only does not make the file busy.
  const reader = spawn('sh', ['-c', `exec 3<"${busy}"; echo ready; exec sleep 600`], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.teardown(() => reader.kill('SIGKILL'));
  await new Promise<void>((resolve) => reader.stdout.once('data', () => resolve()));
  t.deepEqual(await targetUsers(await fs.stat(busy)), []);
  const r = await runCli(['restore', ...repo.args, '--force', versionId, busy], { env: repo.env });
  t.is(r.code, 0, r.stderr);
});

// This kernel may lack device-mapper (containers): then holders are covered by the fake /sys below only.
const dmTest = existsSync('/sys/module/dm_mod') && !why ? test.serial : test.serial.skip;
dmTest('a device held by device-mapper is refused (needs device-mapper in the kernel)', async (t) => {
  const { dir, repo, versionId } = await fixture(t);
  // A device held by device-mapper (as LVM, RAID and dm-crypt hold theirs).
  const held = path.join(dir, 'held.img');
  await fs.writeFile(held, Buffer.alloc(0));
  await fs.truncate(held, 16 * MiB);
  const heldDev = await attachLoop(t, held);
  const dmName = `blocksafe-test-${process.pid}`;
  await run('dmsetup', ['create', dmName, '--table', `0 ${(16 * MiB) / 512} linear ${heldDev} 0`]);
  t.teardown(() => runStatus('dmsetup', ['remove', dmName]));
  await restoreRefused(t, repo, versionId, heldDev, new RegExp(`Target ${heldDev} is in use: held by dm-\\d+ \\(/dev/mapper/${dmName}\\) \\(LVM, RAID or encryption\\)`));
});

test('targetUsers: a fake /sys and /proc (a loop backing file, holders, swap) are read as the kernel writes them', async (t) => {
  const dir = await tempDir(t, 'blocksafe-inuse-fake-');
  const sys = path.join(dir, 'sys');
  const proc = path.join(dir, 'proc');
  const file = path.join(dir, 'backing file.img');
  await fs.writeFile(file, 'x');
  const st = await fs.stat(file);
  await fs.mkdir(path.join(sys, 'block', 'loop7', 'loop'), { recursive: true });
  await fs.mkdir(path.join(sys, 'block', 'loop7', 'holders', 'dm-3'), { recursive: true });
  await fs.writeFile(path.join(sys, 'block', 'loop7', 'loop', 'backing_file'), `${file}\n`);
  await fs.writeFile(path.join(sys, 'block', 'loop7', 'dev'), '7:7\n');
  await fs.mkdir(path.join(sys, 'class', 'block', 'dm-3', 'dm'), { recursive: true });
  await fs.writeFile(path.join(sys, 'class', 'block', 'dm-3', 'dm', 'name'), 'vg-lv\n');
  await fs.mkdir(path.join(proc, 'self'), { recursive: true });
  await fs.writeFile(path.join(proc, 'self', 'mountinfo'), '30 1 7:7 / /srv/with\\040space rw - ext4 /dev/loop7 rw\n');
  await fs.writeFile(path.join(proc, 'swaps'), `Filename\tType\tSize\tUsed\tPriority\n${file.replace(/ /g, '\\040')}\tfile\t4\t0\t-2\n`);
  t.deepEqual(await targetUsers(st, { sys, proc }), [
    'it backs loop device /dev/loop7 (mounted on /srv/with space, held by dm-3 (/dev/mapper/vg-lv) (LVM, RAID or encryption))',
    'it is an active swap file',
  ]);
  // A file nobody uses.
  const free = path.join(dir, 'free.img');
  await fs.writeFile(free, 'y');
  t.deepEqual(await targetUsers(await fs.stat(free), { sys, proc }), []);
});
