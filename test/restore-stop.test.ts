/**
 * `blocksafe restore` stopped by SIGINT, SIGTERM or SIGHUP (ctrl-c, a shutdown, a closed terminal) stops
 * after the blocks in flight and checkpoints there: exit 1 with one line saying where it stopped, and
 * `restore --resume` writes exactly the blocks after that point (not everything since the last periodic
 * checkpoint). Before, a signal killed the process and the restore resumed from the last checkpoint taken
 * every 64 blocks or 5 s.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test from 'ava';
import { spawnCli, waitFor } from './cliHarness.js';
import { backupJson, initKeyFileRepo, makeImage, MiB, runJson, sha256File, tempDir, type ImageLayout } from './helpers.js';

const layout: ImageLayout = {
  blockSize: MiB,
  seed: 'stop',
  blocks: ['random', 'zero', 'text', 'random', 'random', 'text', 'random', 'random', 'random', 'zero', 'random', 'text'],
  tail: { bytes: 77_777, kind: 'random' },
};

/** Bytes a restore to a fresh file writes from block `from` on (zero blocks become holes). */
function bytesFrom(size: number, from: number): number {
  let n = 0;
  for (let i = from; i * MiB < size; i++) if ((layout.blocks[i] ?? layout.tail!.kind) !== 'zero') n += Math.min(MiB, size - i * MiB);
  return n;
}

for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  test(`restore stopped by ${signal} checkpoints where it stopped; --resume writes only the rest`, async (t) => {
    const dir = await tempDir(t, 'blocksafe-stop-');
    const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
    const image = await makeImage(path.join(dir, 'a.img'), layout);
    const v = await backupJson(repo, image.path, 'a');
    // 1 MiB/s: 13 blocks last ~11 s, long enough to be stopped in the middle.
    const config = path.join(dir, 'slow.conf');
    await fs.writeFile(config, '[pipeline]\nwrite_limit = 1M\n');
    const target = path.join(dir, 'out.img');
    const bg = spawnCli(['restore', ...repo.args, '--config', config, v.id, target], repo.env);
    t.teardown(() => bg.child.kill('SIGKILL'));
    // Some blocks are on the target (allocated), the restore is not finished: stop it now.
    await waitFor('blocks written', async () => {
      const st = await fs.stat(target).catch(() => null);
      return st && st.blocks * 512 >= 3 * MiB ? true : undefined;
    });
    bg.child.kill(signal);
    const r = await bg.done;
    t.is(r.code, 1, r.stderr);
    const m = /blocksafe: The restore of version \S+ to \S+ was stopped at (\d+\.\d) % \((\d+) of 13 blocks\); continue it with --resume\.\n$/.exec(r.stderr);
    t.truthy(m, r.stderr);
    const done = Number(m![2]);
    t.true(done >= 1 && done < 13, `stopped in the middle: ${done}`);
    const resumed = await runJson<{ bytes_written: number }>(['restore', ...repo.args, '--resume', v.id, target], { env: repo.env });
    t.is(resumed.bytes_written, bytesFrom(image.size, done), 'the resume starts at the block where the restore stopped');
    t.is(await sha256File(target), image.sha256);
  });
}
