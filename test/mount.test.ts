/**
 * `blocksafe mount` (issue 18): versions as files over real FUSE (/dev/fuse, mounted as root). Every test
 * mounts through the CLI, waits for the mount in /proc/self/mountinfo, and stops it with SIGINT.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readlinkSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import {
  BIN,
  cliEnv,
  haveCommand,
  initKeyFileRepo,
  loopDevicesWork,
  makeImage,
  MiB,
  prngBytes,
  readRange,
  ROOT,
  run,
  runCli,
  runJson,
  runOk,
  runStatus,
  sha256,
  sha256File,
  tempDir,
  textBytes,
  type RepoFixture,
  type VersionJson,
} from './helpers.js';

const canMount = process.getuid?.() === 0 && existsSync('/dev/fuse') && haveCommand('mount') && haveCommand('umount');
const ci = process.env.CI === 'true';
const fuseTest = canMount || ci ? test.serial : test.skip;

function mounted(dir: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === dir);
}

async function until(what: string, probe: () => boolean, proc?: ChildProcess, stderr?: () => string): Promise<void> {
  const end = Date.now() + 30_000;
  while (!probe()) {
    if (proc && proc.exitCode !== null) throw new Error(`blocksafe mount exited ${proc.exitCode} before ${what}:\n${stderr?.()}`);
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface Mount {
  dir: string;
  data(id: string): string;
  /** SIGINT, then the exit code and output; the mount is gone afterwards. */
  stop(): Promise<{ code: number | null; stdout: string; stderr: string }>;
  signal(): void;
  stderr(): string;
  running(): boolean;
}

async function mount(t: ExecutionContext, repo: RepoFixture, dir: string, args: string[]): Promise<Mount> {
  await fs.mkdir(dir, { recursive: true });
  const proc = spawn(process.execPath, [BIN, 'mount', ...repo.args, dir, ...args], { cwd: ROOT, env: cliEnv(repo.env), stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (b: Buffer) => (stdout += b.toString()));
  proc.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  // 'close': exited and its output read to the end.
  const exited = new Promise<number | null>((resolve) => proc.once('close', (code) => resolve(code)));
  t.teardown(async () => {
    if (proc.exitCode === null) {
      proc.kill('SIGINT');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
    }
    if (mounted(dir)) await runStatus('umount', ['-l', dir]);
    if (proc.exitCode === null) proc.kill('SIGKILL');
  });
  await until(
    `the mount on ${dir}`,
    () => mounted(dir),
    proc,
    () => stderr,
  );
  return {
    dir,
    data: (id) => path.join(dir, 'by_id', id, 'data'),
    signal: () => proc.kill('SIGINT'),
    stderr: () => stderr,
    running: () => proc.exitCode === null && proc.signalCode === null,
    stop: async () => {
      proc.kill('SIGINT');
      const code = await exited;
      return { code, stdout, stderr };
    },
  };
}

const FILES: Record<string, Buffer> = {
  'random.bin': prngBytes('mount', 'random.bin', 3 * MiB + 4321),
  'notes/readme.txt': textBytes('mount', 'readme', 200_000),
  'notes/deep/small.bin': prngBytes('mount', 'small', 777),
};

async function makeExt4(dir: string): Promise<string> {
  const src = path.join(dir, 'tree');
  for (const [rel, data] of Object.entries(FILES)) {
    await fs.mkdir(path.dirname(path.join(src, rel)), { recursive: true });
    await fs.writeFile(path.join(src, rel), data);
  }
  const img = path.join(dir, 'fs.img');
  await run('mkfs.ext4', ['-q', '-F', '-d', src, '-E', 'root_owner=0:0', img, '24M']);
  return img;
}

fuseTest('an ext4 backup mounted: data equals the image, loop-mounts with equal files, metadata files match show --json, rm refused', async (t) => {
  if (!loopDevicesWork()) return t.fail('loop devices are needed');
  const dir = await tempDir(t);
  const img = await makeExt4(dir);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const v1 = await runJson<VersionJson>(['backup', ...repo.args, img, 'fsvol', '--snapshot-name', 'snap-1'], { env: repo.env });
  await runOk(['tag', 'add', ...repo.args, v1.id, 'keep-me', 'second'], { env: repo.env });
  const v2 = await runJson<VersionJson>(['backup', ...repo.args, img, 'fsvol'], { env: repo.env });

  const m = await mount(t, repo, path.join(dir, 'mnt'), []);
  t.deepEqual((await fs.readdir(m.dir)).sort(), ['by_id', 'by_name']);
  t.deepEqual((await fs.readdir(path.join(m.dir, 'by_id'))).sort(), [v1.id, v2.id].sort());
  t.is(await sha256File(m.data(v1.id)), await sha256File(img), 'data is the image');
  t.is((await fs.stat(m.data(v1.id))).size, (await fs.stat(img)).size, 'exact size');

  // backy2's small files and info.json equal `show --json`.
  const showOut = (await runOk(['show', ...repo.args, '--json', v1.id], { env: repo.env })).stdout;
  const shown = JSON.parse(showOut) as VersionJson & { expire: string | null; protected: boolean; valid: boolean };
  const vdir = path.join(m.dir, 'by_id', v1.id);
  t.is(await fs.readFile(path.join(vdir, 'info.json'), 'utf8'), showOut, 'info.json is byte for byte `show --json`');
  t.is(await fs.readFile(path.join(vdir, 'name'), 'utf8'), `${shown.name}\n`);
  t.is(await fs.readFile(path.join(vdir, 'snapshot_name'), 'utf8'), 'snap-1\n');
  t.is(await fs.readFile(path.join(vdir, 'tags'), 'utf8'), shown.tags.map((x) => `${x}\n`).join(''));
  t.true(shown.tags.includes('keep-me'));
  t.is(await fs.readFile(path.join(vdir, 'valid'), 'utf8'), `${shown.valid}\n`);
  t.is(await fs.readFile(path.join(vdir, 'protected'), 'utf8'), `${shown.protected}\n`);
  t.is(await fs.readFile(path.join(vdir, 'expire'), 'utf8'), shown.expire ? `${shown.expire}\n` : '');

  // by_name: one link per version, oldest first, and latest.
  const byName = path.join(m.dir, 'by_name', 'fsvol');
  const links = await fs.readdir(byName);
  t.is(links.length, 3);
  t.regex(links[0]!, new RegExp(`^\\d{4}-\\d\\d-\\d\\d_\\d\\d:\\d\\d:\\d\\d_${v1.id}$`));
  t.true(links[1]!.endsWith(`_${v2.id}`));
  t.is(links[2], 'latest');
  t.is(readlinkSync(path.join(byName, 'latest')), `../../by_id/${v2.id}`);
  t.is(await sha256File(path.join(byName, links[0]!, 'data')), await sha256File(img), 'links resolve');

  // The data file loop-mounted read-only: every file equal.
  const fsDir = path.join(dir, 'fs');
  await fs.mkdir(fsDir);
  await run('mount', ['-o', 'loop,ro', m.data(v2.id), fsDir]);
  try {
    for (const [rel, data] of Object.entries(FILES)) t.is(await sha256File(path.join(fsDir, rel)), sha256(data), rel);
  } finally {
    await run('umount', [fsDir]);
  }

  // A mounted version cannot be removed; nothing changes.
  const rm = await runCli(['rm', ...repo.args, '--force', v1.id], { env: repo.env });
  t.is(rm.code, 4, rm.stderr);
  t.regex(rm.stderr, /lock/i);
  t.is(await sha256File(m.data(v1.id)), await sha256File(img));

  // Writes are refused on a read-only mount.
  await t.throwsAsync(fs.open(m.data(v1.id), 'r+'), { code: 'EROFS' });

  const stopped = await m.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.false(mounted(m.dir), 'unmounted on SIGINT');
  t.is((await runCli(['rm', ...repo.args, '--force', v1.id], { env: repo.env })).code, 0, 'removable once unmounted');
});

fuseTest('--rw: writes are visible through the mount and gone after unmount; --keep-as stores them as a protected version', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'img'), { blocks: ['random', 'zero', 'text', 'random'], blockSize: MiB, seed: 'mount-rw' });
  const v = await runJson<VersionJson>(['backup', ...repo.args, image.path, 'vol'], { env: repo.env });
  const patch = prngBytes('mount', 'patch', 10_000);
  const at = MiB - 3000; // across a block boundary, into the sparse block
  const expected = Buffer.from(await fs.readFile(image.path));
  patch.copy(expected, at);

  const write = async (file: string) => {
    const fh = await fs.open(file, 'r+');
    await fh.write(patch, 0, patch.length, at);
    await fh.sync();
    await fh.close();
  };

  const m = await mount(t, repo, path.join(dir, 'mnt'), ['--rw', '--overlay-dir', dir, v.id]);
  // The sparse (all-zero) block is a hole: SEEK_DATA/SEEK_HOLE see it; after the write its first granules are data.
  t.deepEqual(await seeks(m.data(v.id)), { hole0: MiB, data1: 2 * MiB, end: 4 * MiB });
  await write(m.data(v.id));
  t.deepEqual(await seeks(m.data(v.id)), { hole0: MiB + 8192, data1: MiB, end: 4 * MiB });
  t.deepEqual(await readRange(m.data(v.id), at - 10, patch.length + 20), expected.subarray(at - 10, at + patch.length + 10), 'written bytes read back');
  t.is(await sha256File(m.data(v.id)), sha256(expected));
  const stopped = await m.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.regex(stopped.stderr, /Discarded the overlay/);
  t.deepEqual(
    (await fs.readdir(dir)).filter((f) => f.endsWith('.overlay')),
    [],
    'overlay file removed',
  );
  await runOk(['restore', ...repo.args, v.id, path.join(dir, 'restored')], { env: repo.env });
  t.is(await sha256File(path.join(dir, 'restored')), image.sha256, 'the version is unchanged');

  const mnt2 = path.join(dir, 'mnt2');
  const k = await mount(t, repo, mnt2, ['--rw', '--keep-as', 'vol-edited', '--json', v.id]);
  await write(k.data(v.id));
  const kept = await k.stop();
  t.is(kept.code, 0, kept.stderr);
  // --json: one object per line, as the TUI reads them.
  const events = kept.stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { event: string; mountpoint?: string; read_only?: boolean; versions?: { id: string; data: string }[]; version?: { id: string } });
  t.deepEqual(
    events.map((e) => e.event),
    ['mounted', 'kept', 'unmounted'],
  );
  t.like(events[0], { mountpoint: mnt2, read_only: false });
  t.deepEqual(
    events[0]!.versions!.map((x) => [x.id, x.data]),
    [[v.id, k.data(v.id)]],
  );
  const keptId = events[1]!.version!.id;
  const shown = JSON.parse((await runOk(['show', ...repo.args, '--json', keptId], { env: repo.env })).stdout) as VersionJson & { protected: boolean };
  t.is(shown.name, 'vol-edited');
  t.true(shown.protected);
  await runOk(['restore', ...repo.args, keptId, path.join(dir, 'kept')], { env: repo.env });
  t.is(await sha256File(path.join(dir, 'kept')), sha256(expected), 'the kept version restores to the written bytes');
});

/** lseek(SEEK_HOLE, 0), lseek(SEEK_DATA, 1 MiB) and the size, through python3 (Node has no SEEK_DATA). */
async function seeks(file: string): Promise<{ hole0: number; data1: number; end: number }> {
  const py = `import os,json,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nprint(json.dumps({"hole0":os.lseek(fd,0,os.SEEK_HOLE),"data1":os.lseek(fd,${MiB},os.SEEK_DATA),"end":os.lseek(fd,0,os.SEEK_END)}))`;
  return JSON.parse((await run('python3', ['-c', py, file])).stdout) as { hole0: number; data1: number; end: number };
}

fuseTest('a damaged block gives EIO on exactly its range; the rest reads back and the mount stays usable', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'img'), { blocks: ['random', 'text', 'random'], blockSize: MiB, seed: 'mount-damage' });
  const v = await runJson<VersionJson>(['backup', ...repo.args, image.path, 'vol'], { env: repo.env });
  // The text block compresses: its object is the smallest. Damage one byte of it.
  const objects: { file: string; size: number }[] = [];
  for (const sub of await fs.readdir(path.join(repo.dir, 'data'))) {
    for (const o of await fs.readdir(path.join(repo.dir, 'data', sub))) {
      const file = path.join(repo.dir, 'data', sub, o);
      objects.push({ file, size: (await fs.stat(file)).size });
    }
  }
  t.is(objects.length, 3);
  const victim = objects.sort((a, b) => a.size - b.size)[0]!.file;
  const raw = await fs.readFile(victim);
  raw[100] = raw[100]! ^ 0x55;
  await fs.writeFile(victim, raw);

  const m = await mount(t, repo, path.join(dir, 'mnt'), [v.id]);
  const dd = (skip4k: number) => runStatus('dd', [`if=${m.data(v.id)}`, 'of=/dev/null', 'bs=4096', `skip=${skip4k}`, 'count=1']);
  const pages = MiB / 4096;
  for (const p of [0, pages - 1, 2 * pages, 3 * pages - 1]) t.is((await dd(p)).code, 0, `page ${p} outside the damaged block reads`);
  for (const p of [pages, pages + 7, 2 * pages - 1]) {
    const r = await dd(p);
    t.not(r.code, 0, `page ${p} inside the damaged block fails`);
    t.regex(r.stderr, /Input\/output error/);
  }
  t.deepEqual(await readRange(m.data(v.id), 0, MiB), await readRange(image.path, 0, MiB), 'the block before');
  t.deepEqual(await readRange(m.data(v.id), 2 * MiB, MiB), await readRange(image.path, 2 * MiB, MiB), 'the block after');
  const stopped = await m.stop();
  t.is(stopped.code, 0);
  t.regex(stopped.stderr, /damaged/, 'the reason is logged');
});

fuseTest('refusals: missing mount point, a file, a stale mount left by a killed process, --keep-as without --rw', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'img'), { blocks: ['random'], blockSize: MiB, seed: 'mount-refuse' });
  const v = await runJson<VersionJson>(['backup', ...repo.args, image.path, 'vol'], { env: repo.env });
  const missing = await runCli(['mount', ...repo.args, path.join(dir, 'nope')], { env: repo.env });
  t.is(missing.code, 2);
  t.regex(missing.stderr, /^blocksafe: Mount point .*nope does not exist/);
  const file = await runCli(['mount', ...repo.args, image.path], { env: repo.env });
  t.is(file.code, 2);
  t.regex(file.stderr, /is not a directory/);
  const keep = await runCli(['mount', ...repo.args, dir, '--keep-as', 'x'], { env: repo.env });
  t.is(keep.code, 2);
  t.regex(keep.stderr, /--keep-as needs --rw/);

  // SIGKILL leaves a dead FUSE mount behind: the next mount names it and the command that clears it.
  const mnt = path.join(dir, 'mnt');
  await fs.mkdir(mnt);
  const proc = spawn(process.execPath, [BIN, 'mount', ...repo.args, mnt, v.id], { cwd: ROOT, env: cliEnv(repo.env), stdio: 'ignore' });
  t.teardown(async () => {
    if (mounted(mnt)) await runStatus('umount', ['-l', mnt]);
  });
  await until('the mount', () => mounted(mnt), proc);
  const gone = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGKILL');
  await gone;
  const stale = await runCli(['mount', ...repo.args, mnt, v.id], { env: repo.env });
  t.is(stale.code, 1);
  t.regex(stale.stderr, new RegExp(`stale FUSE mount .* umount ${mnt}`));
  await run('umount', [mnt]);
  t.false(mounted(mnt));
  // And the version lock of the killed process does not block a new mount.
  const again = await mount(t, repo, mnt, [v.id]);
  t.is(await sha256File(again.data(v.id)), image.sha256);
  t.is((await again.stop()).code, 0);
});

fuseTest('Ctrl-C while a file is open: says so and keeps serving; Ctrl-C again once it is closed unmounts', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'img'), { blocks: ['random', 'text'], blockSize: MiB, seed: 'mount-busy' });
  const v = await runJson<VersionJson>(['backup', ...repo.args, image.path, 'vol'], { env: repo.env });
  const m = await mount(t, repo, path.join(dir, 'mnt'), [v.id]);
  // Held open by another process (this one must not read its own server's mount synchronously; it does not).
  const holder = spawn('sh', ['-c', 'exec 3<"$1"; read -r _', 'holder', m.data(v.id)], { stdio: ['pipe', 'ignore', 'inherit'] });
  const holderGone = new Promise((r) => holder.once('exit', r));
  t.teardown(() => void holder.kill());
  await until('the holder to open the file', () => existsSync(`/proc/${holder.pid}/fd/3`));
  m.signal();
  await until('the busy message', () => /cannot unmount yet .*busy/.test(m.stderr()));
  t.true(mounted(m.dir), 'still mounted');
  t.true(m.running());
  t.is(await sha256File(m.data(v.id)), image.sha256, 'still serving');
  holder.stdin!.end('\n');
  await holderGone;
  const stopped = await m.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.false(mounted(m.dir));
});
