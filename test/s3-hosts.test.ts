/**
 * Two machines sharing one S3 bucket (issue 13): two "hosts" are two state directories (two LMDB indexes)
 * and two host identities (BLOCKSAFE_TEST_HOST gives each its own host name and boot id, so neither can
 * judge the other's processes by pid). They see each other only through leases in the bucket (locks/) and
 * the store's manifests and gc/generation. Against the real Ceph RADOS Gateway.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test from 'ava';
import { killOnTeardown, pausePoints, spawnCli } from './cliHarness.js';
import { assertCliError, makeImage, runCli, runJson, runOk, sha256File, tempDir, type BlockSpec, type VersionJson } from './helpers.js';
import type { CleanupJson } from './lcHarness.js';
import { requireGateway, s3Repo } from './s3gateway.js';

const BS = 64 * 1024;
const hostEnv = (host: string, extra: Record<string, string> = {}) => ({ BLOCKSAFE_TEST_HOST: host, ...extra });
/** 31 minutes later: past the default 30 minutes after which a silent lease holder counts as dead. */
const LATER = { BLOCKSAFE_TEST_CLOCK_OFFSET: String(31 * 60_000) };

test('two hosts on one bucket: a second writer and a sweep are refused while the first writes; its lease expires when it dies; a stale index never deduplicates against deleted blocks', async (t) => {
  await requireGateway();
  const dir = await tempDir(t);
  const a = await s3Repo(t, path.join(dir, 'a'));
  await fs.mkdir(path.join(dir, 'b'));
  await fs.copyFile(a.keyFile, path.join(dir, 'b', 'repo.key'));
  const b = await s3Repo(t, path.join(dir, 'b'), { bucket: a.bucket, prefix: a.prefix });
  await runOk(['init', ...a.args, '--block-size', '64K', '--create-bucket']);
  const img = await makeImage(path.join(dir, 'vol.img'), { blockSize: BS, blocks: Array<BlockSpec>(160).fill('random'), seed: 'hosts' });

  // Host A backs up and stops after its first commit: it holds the volume, its version and "writer".
  const pause = await pausePoints(t);
  const backupA = killOnTeardown(t, spawnCli(['backup', ...a.args, img.path, 'vol'], { ...hostEnv('host-a'), ...pause.env('writer.commit#1') }));
  t.true(await pause.reached('writer.commit#1', backupA), backupA.stderr());

  assertCliError(t, await runCli(['backup', ...b.args, img.path, 'vol'], { env: hostEnv('host-b') }), 4, /Volume "vol" is locked by pid \d+ on host-a .*lease in the store/);
  const postponed = await runJson<CleanupJson & { sweep_postponed: string | null }>(['cleanup', ...b.args, '--grace', '1h'], { env: hostEnv('host-b') });
  t.is(postponed.deleted, 0);
  t.regex(postponed.sweep_postponed ?? '', /host-a/, 'no sweep while a writer of another index runs');

  // Host A dies. Host B cannot tell by pid: the lease holds until it is older than stale_after.
  await backupA.kill9();
  assertCliError(t, await runCli(['backup', ...b.args, img.path, 'vol'], { env: hostEnv('host-b') }), 4, /host-a/);
  const vB = await runJson<VersionJson>(['backup', ...b.args, img.path, 'vol'], { env: hostEnv('host-b', LATER) });
  t.true(vB.complete);

  // Host A sees B's version through the store, and cannot remove it while B restores it.
  t.true((await runJson<VersionJson[]>(['ls', ...a.args], { env: hostEnv('host-a') })).some((v) => v.id === vB.id && v.complete));
  const target = path.join(dir, 'restored.img');
  const restoreB = killOnTeardown(t, spawnCli(['restore', ...b.args, vB.id, target], { ...hostEnv('host-b'), ...pause.env('restore.checkpoint#1') }));
  t.true(await pause.reached('restore.checkpoint#1', restoreB), restoreB.stderr());
  assertCliError(t, await runCli(['rm', ...a.args, vB.id], { env: hostEnv('host-a') }), 4, new RegExp(`Version ${vB.id} is locked by pid \\d+ on host-b`));
  await pause.go('restore.checkpoint#1');
  t.is((await restoreB.done).code, 0, restoreB.stderr());
  t.is(await sha256File(target), img.sha256);

  // Host A removes it and cleans up (nothing writes anywhere now); A's commands see that its killed backup's
  // process is gone and delete that lease, so B need not wait 30 minutes for it. B's index still lists those blocks:
  // the next backup on B must notice the cleanup (gc/generation), store them again, and restore intact.
  const interrupted = (await runJson<VersionJson[]>(['ls', ...a.args], { env: hostEnv('host-a') })).find((v) => !v.complete)!;
  await runOk(['rm', ...a.args, vB.id, interrupted.id], { env: hostEnv('host-a') });
  const gc = await runJson<CleanupJson>(['cleanup', ...a.args, '--grace', '0'], { env: hostEnv('host-a') });
  t.true(gc.deleted >= 160, `the cleanup deleted the removed version's blocks (${gc.deleted})`);
  const again = await runJson<VersionJson>(['backup', ...b.args, img.path, 'vol'], { env: hostEnv('host-b') });
  t.is(again.stats.blocks_deduplicated, 0, 'nothing deduplicated against a deleted block');
  const target2 = path.join(dir, 'restored2.img');
  await runOk(['restore', ...a.args, again.id, target2], { env: hostEnv('host-a') });
  t.is(await sha256File(target2), img.sha256);
});
