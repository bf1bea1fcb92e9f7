/**
 * A repository on a read-only filesystem (a USB disk mounted read-only in a rescue system) still lists and
 * restores, through a temporary index rebuilt from its manifests; a command that would change it fails with one
 * clear line. Uses a read-only bind mount (root, as in CI).
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { backupJson, initRepo, makeImage, MiB, runCli, runJson, sha256File, tempDir, type VersionJson } from './helpers.js';

test('a read-only repository lists and restores byte-identically; a backup into it is one clear error', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const img = await makeImage(path.join(dir, 'disk.img'), { blocks: ['random', 'zero', 'text', { dup: 0 }], blockSize: MiB, tail: { bytes: 4321, kind: 'text' }, seed: 'ro' });
  const v = await backupJson(repo, img.path, 'vol', ['-t', 'keep']);
  const ro = path.join(dir, 'ro');
  await fs.mkdir(ro);
  try {
    execFileSync('mount', ['--bind', repo.dir, ro]);
    execFileSync('mount', ['-o', 'remount,ro,bind', ro]);
  } catch (err) {
    t.fail(`a read-only bind mount is needed for this test (run as root): ${(err as Error).message}`);
    return;
  }
  t.teardown(() => execFileSync('umount', [ro]));
  const args = ['--repo', ro];

  const ls = await runCli(['ls', ...args, '--json'], { env: repo.env });
  t.is(ls.code, 0, ls.stderr);
  t.regex(ls.stderr, /read-only; using a temporary index/);
  const versions = JSON.parse(ls.stdout) as VersionJson[];
  t.deepEqual(
    versions.map((x) => [x.id, x.tags.includes('keep')]),
    [[v.id, true]],
  );

  const out = path.join(dir, 'restored.img');
  const r = await runCli(['restore', ...args, v.id, out], { env: repo.env });
  t.is(r.code, 0, r.stderr);
  t.is(await sha256File(out), img.sha256);

  const b = await runCli(['backup', ...args, img.path, 'vol', '--json'], { env: repo.env });
  t.is(b.code, 1);
  t.regex(b.stderr.trim().split('\n').pop()!, /^blocksafe: .*read-only/);
  // Nothing was changed, and no temporary index is left behind.
  t.deepEqual(
    (await runJson<VersionJson[]>(['ls', '--repo', repo.dir], { env: repo.env })).map((x) => x.id),
    [v.id],
  );
  const leftovers = (await fs.readdir(process.env.TMPDIR ?? '/tmp')).filter((n) => n.startsWith('blocksafe-index-'));
  t.deepEqual(leftovers, []);
});
