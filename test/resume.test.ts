/**
 * Interrupted backups and restores, killed for real (SIGKILL) in the middle of a run (held at a test pause
 * point after their first commit or checkpoint, so the machine's speed does not matter), then
 * resumed: the result is byte-identical, and what was committed before the kill is not read (backup) or
 * written (restore) again — counted, and for the backup also proven by changing the already-stored part
 * of the source before resuming.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test from 'ava';
import { assertCliError, initRepo, MiB, prngBytes, runCli, runJson, sha256File, type RepoFixture } from './helpers.js';
import { fastTempDir, killOnTeardown, type FullVersion, lsJson, nonZeroBlocks, pausePoints, randomFile, spawnCli } from './cliHarness.js';

const BS = MiB;

/** A source of `blocks` 1 MiB blocks: random data, with every 5th block zero (so sparse blocks are counted too). */
async function makeSource(file: string, blocks: number, seed: string): Promise<boolean[]> {
  await randomFile(file, blocks * BS, seed);
  const fh = await fs.open(file, 'r+');
  try {
    const zero = Buffer.alloc(BS);
    for (let b = 3; b < blocks; b += 5) await fh.write(zero, 0, BS, b * BS);
  } finally {
    await fh.close();
  }
  return nonZeroBlocks(file, BS);
}

const countRange = (nz: boolean[], from: number, to: number) => nz.slice(from, to).filter(Boolean).length;

/** Starts a backup, stops it at its first commit and kills it there (SIGKILL); returns the incomplete version. */
async function interruptedBackup(t: Parameters<typeof killOnTeardown>[0], repo: RepoFixture, source: string, name: string, blocks: number): Promise<FullVersion> {
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['backup', ...repo.args, source, name], { ...repo.env, ...pause.env('writer.commit#1') }));
  if (!(await pause.reached('writer.commit#1', bg))) throw new Error(`the backup ended before its first commit: ${bg.stderr()}`);
  const r = await bg.kill9();
  if (r.signal !== 'SIGKILL') throw new Error(`the backup was not killed mid-run (exit ${r.code}): ${r.stderr}`);
  const [v] = (await lsJson(repo, name)).filter((x) => !x.complete);
  if (!v) throw new Error('no incomplete version after the kill');
  const done = v.blocks_done;
  if (!(done > 0 && done < blocks)) throw new Error(`blocks_done ${done} is not mid-run`);
  return v;
}

test('kill -9 during a backup, then backup --resume: committed blocks are not read again; restore byte-identical', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const blocks = 120;
  const source = path.join(dir, 'disk.img');
  const nz = await makeSource(source, blocks, 'resume-backup');
  const original = await sha256File(source);
  const before = await interruptedBackup(t, repo, source, 'disk', blocks);
  const done = before.blocks_done;
  t.false(before.complete);
  t.is(before.stats.blocks_read, countRange(nz, 0, done), 'the committed statistics cover exactly the committed blocks');

  // An incomplete version cannot be restored.
  const refused = await runCli(['restore', ...repo.args, before.id, path.join(dir, 'nope.img')], { env: repo.env });
  assertCliError(t, refused, 1, /incomplete/);

  // Change a block that was stored before the kill: a resume that re-read it would store the new content.
  const fh = await fs.open(source, 'r+');
  await fh.write(prngBytes('tamper', 'x', 4096), 0, 4096, 0);
  await fh.close();

  const after = await runJson<FullVersion>(['backup', ...repo.args, source, 'disk', '--resume'], { env: repo.env });
  t.is(after.id, before.id, 'the interrupted version is continued, not a new one');
  t.true(after.complete);
  t.is(after.blocks_done, blocks);
  t.is(after.stats.blocks_read - before.stats.blocks_read, countRange(nz, done, blocks), `the resumed run read exactly the data blocks from ${done} on`);
  t.is(after.stats.blocks_read, countRange(nz, 0, blocks), 'statistics cover both runs');
  t.is(after.stats.blocks_sparse, blocks - countRange(nz, 0, blocks));
  const versions = await lsJson(repo, 'disk');
  t.deepEqual(
    versions.map((v) => [v.id, v.complete]),
    [[before.id, true]],
  );

  const target = path.join(dir, 'restored.img');
  const r = await runJson<{ damaged: unknown[] }>(['restore', ...repo.args, after.id, target], { env: repo.env });
  t.deepEqual(r.damaged, []);
  t.is(await sha256File(target), original, 'byte-identical to the source as it was backed up (block 0 was not read again)');
});

test('kill -9 during a restore: a plain restore is refused, restore --resume finishes without rewriting the checkpointed part', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const blocks = 160;
  const source = path.join(dir, 'disk.img');
  const nz = await makeSource(source, blocks, 'resume-restore');
  const v = await runJson<FullVersion>(['backup', ...repo.args, source, 'disk'], { env: repo.env });
  const target = path.join(dir, 'target.img');

  // Killed at its first checkpoint (after 64 blocks, or earlier on a slow machine: every 5 s), with most of
  // the image still to come.
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['restore', ...repo.args, v.id, target], { ...repo.env, ...pause.env('restore.checkpoint#1') }));
  t.true(await pause.reached('restore.checkpoint#1', bg), `the restore reached its first checkpoint: ${bg.stderr()}`);
  const killed = await bg.kill9();
  t.is(killed.signal, 'SIGKILL', `killed mid-run (stderr: ${killed.stderr})`);
  t.not(await sha256File(target), await sha256File(source), 'the target is unfinished');

  const plain = await runCli(['restore', ...repo.args, v.id, target], { env: repo.env });
  const msg = assertCliError(t, plain, 1, /--resume/);
  t.regex(msg, /interrupted/);
  const forceless = await runCli(['restore', ...repo.args, v.id, target, '--json'], { env: repo.env });
  t.is(forceless.code, 1, 'refused with --json too');

  const r = await runJson<{ bytes_written: number; size: number; damaged: unknown[] }>(['restore', ...repo.args, v.id, target, '--resume'], { env: repo.env });
  t.deepEqual(r.damaged, []);
  const totalData = countRange(nz, 0, blocks) * BS;
  t.true(r.bytes_written < totalData, `the resumed restore wrote ${r.bytes_written} of ${totalData} data bytes`);
  // It restarts at the checkpoint (a block boundary after block 0) and writes exactly the data blocks from there on.
  const restartPoints = Array.from({ length: blocks - 1 }, (_, i) => i + 1).filter((cp) => r.bytes_written === countRange(nz, cp, blocks) * BS);
  t.true(restartPoints.length > 0, `bytes_written ${r.bytes_written} matches a restart at a block boundary after the first block`);
  t.is(await sha256File(target), await sha256File(source), 'byte-identical after the resume');

  // Nothing left to resume now.
  const again = await runCli(['restore', ...repo.args, v.id, target, '--resume'], { env: repo.env });
  t.not(again.code, 0);
  t.regex(again.stderr, /no interrupted restore/i);
});

test('a plain backup after an interrupted one (encrypted repo) notes --resume and creates a new, complete version', async (t) => {
  const dir = await fastTempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' }); // default encryption
  const blocks = 120;
  const source = path.join(dir, 'disk.img');
  await makeSource(source, blocks, 'resume-note');
  const interrupted = await interruptedBackup(t, repo, source, 'disk', blocks);

  const r = await runCli(['backup', ...repo.args, source, 'disk'], { env: repo.env });
  t.is(r.code, 0, r.stderr);
  t.regex(r.stderr, /--resume/, 'stdin is not a terminal: a note tells how to resume instead of asking');
  t.true(r.stderr.includes(interrupted.id), 'the note names the interrupted version');
  const id = r.stdout.trim();
  t.regex(id, /^\S+$/);
  t.not(id, interrupted.id, 'a new version');
  const versions = await lsJson(repo, 'disk');
  const fresh = versions.find((v) => v.id === id);
  t.truthy(fresh);
  t.true(fresh!.complete);
  t.is(fresh!.base, null, 'an incomplete version is never a base');
  t.true(
    versions.some((v) => v.id === interrupted.id && !v.complete),
    'the interrupted version is still there (resumable)',
  );
  const target = path.join(dir, 'restored.img');
  await runJson(['restore', ...repo.args, id, target], { env: repo.env });
  t.is(await sha256File(target), await sha256File(source));
});
