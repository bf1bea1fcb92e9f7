/**
 * Backup reads must not flood the page cache (O_DIRECT), and must still work where O_DIRECT is not
 * available. The page-cache test runs on a real ext4 filesystem on a loop device (root needed: this
 * environment is expected to provide it, so a missing privilege is a failure, not a skip) and measures the
 * source file's cached pages with fincore(1).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { initRepo, MiB, prngBytes, run, runJson, sha256File, type RepoFixture, type VersionJson } from './helpers.js';
import { fastTempDir, have, randomFile, writeConfig } from './cliHarness.js';

const PAGE = 4096;

/** Fails the test with a clear message unless we are root with losetup, mkfs.ext4, mount and fincore. */
function requirePrivileges(t: ExecutionContext): boolean {
  const missing = ['losetup', 'mkfs.ext4', 'mount', 'umount', 'fincore', 'dd'].filter((c) => !have(c));
  if (process.getuid?.() !== 0 || missing.length > 0) {
    t.fail(
      `This test needs root and losetup, mkfs.ext4, mount and fincore (util-linux) to mount a real filesystem: ` +
        `uid ${process.getuid?.()}, missing: ${missing.join(', ') || 'none'}. Run the tests as root in this environment.`,
    );
    return false;
  }
  return true;
}

/** A fresh ext4 filesystem on a loop device, mounted; unmounted, detached and removed when the test ends. */
async function mountExt4(t: ExecutionContext, sizeMiB: number): Promise<string> {
  // Our own directory (not a shared fixture) so the one teardown can unmount before anything is removed.
  const dir = await fs.mkdtemp(path.join(tmpdir(), 'blocksafe-directio-'));
  const img = path.join(dir, 'fs.img');
  const mnt = path.join(dir, 'mnt');
  await fs.mkdir(mnt);
  let dev: string | null = null;
  let mounted = false;
  t.teardown(async () => {
    if (mounted) {
      for (let i = 0; i < 20 && spawnSync('umount', [mnt], { stdio: 'ignore' }).status !== 0; i++) await new Promise((r) => setTimeout(r, 100));
    }
    if (dev) {
      for (let i = 0; i < 20 && spawnSync('losetup', ['-d', dev], { stdio: 'ignore' }).status !== 0; i++) await new Promise((r) => setTimeout(r, 100));
    }
    // only once nothing is mounted there any more
    if (spawnSync('mountpoint', ['-q', mnt]).status !== 0) await fs.rm(dir, { recursive: true, force: true });
  });
  await fs.writeFile(img, '');
  await fs.truncate(img, sizeMiB * MiB);
  await run('mkfs.ext4', ['-q', '-F', img]).catch((e: Error) => {
    throw new Error(`mkfs.ext4 failed: ${e.message}`);
  });
  dev = (
    await run('losetup', ['-f', '--show', img]).catch((e: Error) => {
      throw new Error(`losetup could not attach a loop device (are loop devices permitted here?): ${e.message}`);
    })
  ).stdout.trim();
  await run('mount', [dev, mnt]).catch((e: Error) => {
    throw new Error(`mount ${dev} ${mnt} failed (is mounting permitted here?): ${e.message}`);
  });
  mounted = true;
  return mnt;
}

/** Pages of `file` in the page cache (fincore). */
async function cachedPages(file: string): Promise<number> {
  const { stdout } = await run('fincore', ['-b', '-n', '-o', 'PAGES', file]);
  const n = Number(stdout.trim());
  if (!Number.isInteger(n)) throw new Error(`fincore printed "${stdout}"`);
  return n;
}

/** Drops `file` from the page cache (dd's nocache: POSIX_FADV_DONTNEED after a data sync). */
async function evict(file: string): Promise<void> {
  await run('dd', ['if=/dev/null', `of=${file}`, 'oflag=nocache', 'conv=notrunc,fdatasync', 'count=0', 'status=none']);
}

async function restoreMatches(t: ExecutionContext, repo: RepoFixture, dir: string, v: VersionJson, expectedSha: string): Promise<void> {
  const out = path.join(dir, `${v.id}.restored`);
  const r = await runJson<{ damaged: unknown[] }>(['restore', ...repo.args, v.id, out], { env: repo.env });
  t.deepEqual(r.damaged, []);
  t.is(await sha256File(out), expectedSha, `version ${v.id} restores byte-identical`);
}

test('O_DIRECT: with direct_io = true a backup leaves the source out of the page cache; with direct_io = false it fills it', async (t) => {
  if (!requirePrivileges(t)) return;
  const mnt = await mountExt4(t, 96);
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const direct = await writeConfig(dir, 'direct.conf', { direct_io: true });
  const buffered = await writeConfig(dir, 'buffered.conf', { direct_io: false });

  const src = path.join(mnt, 'volume.img');
  const size = 32 * MiB;
  const data = prngBytes('directio', 'volume', size);
  await fs.writeFile(src, data);
  const expectedSha = (await import('node:crypto')).createHash('sha256').update(data).digest('hex');
  const pages = size / PAGE;

  t.true((await cachedPages(src)) > pages / 2, 'precondition: freshly written data is cached (fincore works here)');
  await evict(src);
  t.true((await cachedPages(src)) < 16, 'precondition: the file can be evicted from the page cache');

  const v1 = await runJson<VersionJson>(['--config', direct, 'backup', ...repo.args, src, 'direct'], { env: repo.env });
  t.is(v1.stats.blocks_read, 32, 'the whole file was read');
  const afterDirect = await cachedPages(src);
  t.true(afterDirect < pages / 100, `direct_io = true: ${afterDirect} of ${pages} pages cached after the backup (want < 1 %)`);

  await evict(src);
  const v2 = await runJson<VersionJson>(['--config', buffered, 'backup', ...repo.args, src, 'buffered'], { env: repo.env });
  t.is(v2.stats.blocks_read, 32);
  const afterBuffered = await cachedPages(src);
  t.log(`cached pages of the ${pages}-page source after a backup: direct_io = true ${afterDirect}, direct_io = false ${afterBuffered}`);
  t.true(afterBuffered > pages / 2, `direct_io = false: ${afterBuffered} of ${pages} pages cached after the backup (the contrast that proves the measurement)`);

  await restoreMatches(t, repo, dir, v1, expectedSha);
  await restoreMatches(t, repo, dir, v2, expectedSha);
});

test('O_DIRECT on a file whose size is not a multiple of 4 KiB (unaligned tail): byte-identical', async (t) => {
  if (!requirePrivileges(t)) return;
  const mnt = await mountExt4(t, 32);
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const direct = await writeConfig(dir, 'direct.conf', { direct_io: true });
  const src = path.join(mnt, 'odd.img');
  const data = prngBytes('directio', 'odd', 5 * MiB + 1000);
  data.fill(0, 2 * MiB, 3 * MiB); // a zero block too
  await fs.writeFile(src, data);
  await evict(src);
  const v = await runJson<VersionJson>(['--config', direct, 'backup', ...repo.args, src, 'odd'], { env: repo.env });
  t.is(v.size, 5 * MiB + 1000);
  t.is(v.stats.blocks_sparse, 1);
  t.is(v.stats.blocks_read, 5);
  t.true((await cachedPages(src)) < 64, 'read with O_DIRECT');
  await restoreMatches(t, repo, dir, v, await sha256File(src));
});

test('a source on tmpfs (/dev/shm) backs up correctly with direct_io = true', async (t) => {
  const shm = await fs.mkdtemp('/dev/shm/blocksafe-directio-');
  t.teardown(() => fs.rm(shm, { recursive: true, force: true }));
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const direct = await writeConfig(dir, 'direct.conf', { direct_io: true });
  const src = path.join(shm, 'vol.img');
  await randomFile(src, 8 * MiB + 12345, 'shm');
  const v = await runJson<VersionJson>(['--config', direct, 'backup', ...repo.args, src, 'shm'], { env: repo.env });
  t.true(v.complete);
  t.is(v.stats.blocks_read, 9);
  await restoreMatches(t, repo, dir, v, await sha256File(src));
});

test('a source on a filesystem that refuses O_DIRECT (ramfs: EINVAL at open) falls back to buffered reads', async (t) => {
  if (!requirePrivileges(t)) return;
  const base = await fs.mkdtemp(path.join(tmpdir(), 'blocksafe-ramfs-'));
  let mounted = false;
  t.teardown(async () => {
    if (mounted) spawnSync('umount', [base], { stdio: 'ignore' });
    if (spawnSync('mountpoint', ['-q', base]).status !== 0) await fs.rm(base, { recursive: true, force: true });
  });
  await run('mount', ['-t', 'ramfs', 'ramfs', base]).catch((e: Error) => {
    throw new Error(`mounting a ramfs failed (is mounting permitted here?): ${e.message}`);
  });
  mounted = true;
  const src = path.join(base, 'vol.img');
  await randomFile(src, 6 * MiB + 777, 'ramfs');
  // the premise: O_DIRECT is refused there
  const probe = await fs.open(src, fs.constants.O_RDONLY | fs.constants.O_DIRECT).then(
    async (fh) => {
      await fh.close();
      return 'accepted';
    },
    (e: NodeJS.ErrnoException) => e.code,
  );
  t.is(probe, 'EINVAL', 'precondition: ramfs refuses O_DIRECT');

  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const direct = await writeConfig(dir, 'direct.conf', { direct_io: true });
  const v = await runJson<VersionJson>(['--config', direct, 'backup', ...repo.args, src, 'ramfs'], { env: repo.env });
  t.true(v.complete);
  t.is(v.stats.blocks_read, 7);
  await restoreMatches(t, repo, dir, v, await sha256File(src));
});
