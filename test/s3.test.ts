/**
 * End-to-end tests of S3 repositories against a real Ceph RADOS Gateway, through the real CLI. The gateway
 * must be running (.ci/run starts it with ../shared/services/radosgw/up.sh); when it is not, every test
 * here fails with a message saying how to start it. Each test works in its own fresh bucket.
 */
import test, { type ExecutionContext } from 'ava';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { assertCliError, makeImage, MiB, runCli, runJson, runOk, sha256File, tempDir, type BlockSpec, type CliResult, type Image, type VersionJson } from './helpers.js';
import { spawnCli, killOnTeardown, pausePoints, waitFor } from './cliHarness.js';
import type { CleanupJson } from './lcHarness.js';
import {
  bucketExists,
  createBucket,
  deleteObject,
  getObject,
  listKeys,
  putObject,
  requireGateway,
  S3_ACCESS_KEY,
  S3_ENDPOINT,
  S3_REGION,
  S3_SECRET_KEY,
  s3Repo,
  startGateway,
  stopGateway,
  type S3Repo,
} from './s3gateway.js';

let gatewayProblem: string | undefined;
test.before(async () => {
  try {
    await requireGateway();
  } catch (err) {
    gatewayProblem = (err as Error).message;
  }
});

/** Every test starts with `if (!gateway(t)) return;`: it fails (never skips) without a gateway, and goes no further. */
function gateway(t: ExecutionContext): boolean {
  if (gatewayProblem) t.fail(gatewayProblem);
  return !gatewayProblem;
}

const BS = 1 * MiB;
const BLOCKS = 24;

async function init(repo: S3Repo, extra: string[] = []): Promise<CliResult> {
  return runCli(['init', ...repo.args, '--block-size', '1M', ...extra]);
}

async function backup(repo: S3Repo, source: string, name: string, extra: string[] = []): Promise<VersionJson> {
  return runJson<VersionJson>(['backup', ...repo.args, source, name, ...extra]);
}

async function restoreHash(repo: S3Repo, version: string, target: string): Promise<string> {
  await runOk(['restore', ...repo.args, version, target]);
  return sha256File(target);
}

const dataKeys = (repo: S3Repo) => listKeys(repo.bucket, `${repo.prefix}/data/`);

/** An image of 1 MiB blocks: random and text content, zeros, a duplicate, a partial tail. */
function smallImage(file: string, seed: string): Promise<Image> {
  return makeImage(file, { blockSize: BS, seed, blocks: ['random', 'text', 'zero', 'random', { dup: 0 }, 'text', 'random', 'zero'], tail: { bytes: 123_457, kind: 'text' } });
}

// The one serial test runs before the others, so stopping the gateway disturbs nobody in this file.
test.serial('the gateway stopped in the middle of a backup: one clear error, a consistent repository, then --resume completes byte-identical', async (t) => {
  if (!gateway(t)) return;
  const started = Date.now();
  const phase = (what: string) => t.log(`${((Date.now() - started) / 1000).toFixed(1)} s: ${what}`);
  const dir = await tempDir(t);
  const repo = await s3Repo(t, dir, { pipeline: { read_limit: '4M' } }); // about 5 s for the image
  t.teardown(() => startGateway()); // whatever happens, the other tests need it back
  await runJson<{ id: string }>(['init', ...repo.args, '--block-size', '1M', '--create-bucket']);
  const img = await makeImage(path.join(dir, 'vol.img'), { blockSize: BS, seed: 'outage', blocks: Array.from({ length: BLOCKS }, () => 'random' as const) });

  // The backup stops at its first committed progress (a test pause point); the gateway goes away then.
  const pause = await tempDir(t);
  const bg = killOnTeardown(t, spawnCli(['backup', ...repo.args, img.path, 'vol', '--json'], { BLOCKSAFE_TEST_PAUSE_DIR: pause, BLOCKSAFE_TEST_PAUSE: 'writer.commit' }));
  await waitFor('committed progress', () => (bg.exited() || existsSync(path.join(pause, 'writer.commit.reached')) ? true : undefined), 60_000, 20);
  t.false(bg.exited(), `the backup must still run when the gateway goes away: ${bg.stderr()}`);
  phase('progress committed; stopping radosgw');
  await stopGateway();
  await fs.writeFile(path.join(pause, 'writer.commit.go'), '');
  const r = await bg.done;
  phase('the backup failed');
  const msg = assertCliError(t, r, 1, /^blocksafe: S3 endpoint http:\/\/127\.0\.0\.1:\d+ is not reachable: .*ECONNREFUSED.*\(3 attempts in [\d.]+ m?s\); check that it is running/);
  t.log(msg);

  await startGateway();
  phase('radosgw is back');
  const [interrupted] = await runJson<(VersionJson & { blocks_done: number })[]>(['ls', ...repo.args, 'vol']);
  t.false(interrupted!.complete, 'the interrupted version is listed as incomplete');
  t.true(interrupted!.blocks_done > 0 && interrupted!.blocks_done < BLOCKS, `progress before the outage was committed (${interrupted!.blocks_done} blocks)`);
  phase(`the interrupted version has ${interrupted!.blocks_done} of ${BLOCKS} blocks`);
  const check = await runJson<{ missing_objects: string[] }>(['check', ...repo.args]);
  t.deepEqual(check.missing_objects, [], 'every block the index knows is in the bucket');

  // The rest without the read limit (it also throttles restores).
  const fast = await s3Repo(t, dir, { bucket: repo.bucket, prefix: repo.prefix });
  const done = await backup(fast, img.path, 'vol', ['--resume']);
  phase('backup --resume done');
  t.is(done.id, interrupted!.id);
  t.true(done.complete);
  t.is(done.stats.blocks_read - interrupted!.stats.blocks_read, BLOCKS - interrupted!.blocks_done, 'the resumed backup read only what was not committed');
  t.is(await restoreHash(fast, done.id, path.join(dir, 'restored.img')), img.sha256);
  t.is((await dataKeys(repo)).length, BLOCKS);
  phase('restored and compared');
});

test('init: a missing bucket is an error unless --create-bucket; an existing repository or foreign objects are refused', async (t) => {
  if (!gateway(t)) return;
  const dir = await tempDir(t);
  const repo = await s3Repo(t, dir);

  const missing = await init(repo);
  assertCliError(t, missing, 1, new RegExp(`S3 bucket "${repo.bucket}" does not exist at ${S3_ENDPOINT.replace(/[./]/g, '\\$&')}; .*--create-bucket`));
  t.false(await bucketExists(repo.bucket), 'nothing was created');

  const created = await runJson<{ id: string; location: string }>(['init', ...repo.args, '--block-size', '1M', '--create-bucket']);
  t.is(created.location, repo.url);
  t.true(await bucketExists(repo.bucket));
  const objects = await listKeys(repo.bucket);
  t.deepEqual(objects, [`${repo.prefix}/blocksafe.json`, `${repo.prefix}/keys/keyring`, `${repo.prefix}/keys/slot-1.json`]);
  await fs.access(path.join(repo.stateDir, created.id)); // the LMDB index lives in state_dir/<repository id>

  // An existing bucket is used as it is, with or without --create-bucket.
  const second = await s3Repo(t, dir, { bucket: repo.bucket, prefix: 'second' });
  t.is((await init(second, ['--create-bucket'])).code, 0);
  const third = await s3Repo(t, dir, { bucket: repo.bucket, prefix: 'third' });
  t.is((await init(third)).code, 0);

  const again = await init(repo, ['--create-bucket']);
  assertCliError(t, again, 2, /already holds a blocksafe repository/);
  await putObject(repo.bucket, 'foreign/notes.txt', Buffer.from('not a repository'));
  const foreign = await s3Repo(t, dir, { bucket: repo.bucket, prefix: 'foreign' });
  assertCliError(t, await init(foreign), 2, /s3:\/\/.*\/foreign is not empty \(it holds notes\.txt\)/);
  t.deepEqual(await listKeys(repo.bucket, repo.prefix + '/'), objects, 'refused inits changed nothing');

  const plain = await runCli(['init', '--repo', path.join(dir, 'plain'), '--encryption', 'none', '--create-bucket']);
  assertCliError(t, plain, 2, /--create-bucket applies only to s3:\/\/ repositories/);
});

test('backup and restore round trip, dedup across backups, rm then ls, cleanup of unreferenced objects', async (t) => {
  if (!gateway(t)) return;
  const dir = await tempDir(t);
  const repo = await s3Repo(t, dir);
  t.is((await init(repo, ['--create-bucket'])).code, 0, 'init');
  const img = await smallImage(path.join(dir, 'a.img'), 'roundtrip');

  const v1 = await backup(repo, img.path, 'vol');
  t.true(v1.complete);
  t.is(v1.stats.blocks_written, 6, '3 random + 2 text + the tail; zeros and the duplicate are not stored');
  t.is(await restoreHash(repo, v1.id, path.join(dir, 'r1.img')), img.sha256);
  const afterFirst = await dataKeys(repo);
  t.is(afterFirst.length, 6);
  t.true(afterFirst.every((k) => /^backups\/blocksafe\/data\/[0-9a-f]{2}\/[0-9a-f]{64}$/.test(k)));

  const v2 = await backup(repo, img.path, 'vol');
  t.is(v2.stats.blocks_written, 0, 'the second backup writes nothing new');
  t.deepEqual(await dataKeys(repo), afterFirst, 'object count unchanged');

  // One changed block: one new object.
  const fh = await fs.open(img.path, 'r+');
  await fh.write(Buffer.from('a change in block six'), 0, 21, 6 * BS + 100);
  await fh.close();
  const changed = await sha256File(img.path);
  const v3 = await backup(repo, img.path, 'vol');
  t.is(v3.stats.blocks_written, 1);
  t.is((await dataKeys(repo)).length, 7);
  t.is(await restoreHash(repo, v3.id, path.join(dir, 'r3.img')), changed);

  const manifests = await listKeys(repo.bucket, `${repo.prefix}/manifests/`);
  t.is(manifests.length, 3);
  await runOk(['rm', ...repo.args, v1.id]);
  const ls = await runJson<VersionJson[]>(['ls', ...repo.args]);
  t.deepEqual(ls.map((v) => v.id).sort(), [v2.id, v3.id].sort());
  t.false(
    (await listKeys(repo.bucket, `${repo.prefix}/manifests/`)).some((k) => k.endsWith(`/${v1.id}`)),
    'the manifest of the removed version is gone',
  );

  await runOk(['rm', ...repo.args, v3.id]);
  const result = await runJson<{ deleted: number }>(['cleanup', ...repo.args, '--grace', '0s']);
  t.is(result.deleted, 1, 'only the block unique to the removed version');
  t.deepEqual(await dataKeys(repo), afterFirst);
  t.is(await restoreHash(repo, v2.id, path.join(dir, 'r2b.img')), img.sha256);
});

test('scrub catches a deleted and an altered object (exit 3); the next backup heals them', async (t) => {
  if (!gateway(t)) return;
  const dir = await tempDir(t);
  const repo = await s3Repo(t, dir);
  t.is((await init(repo, ['--create-bucket'])).code, 0, 'init');
  const img = await smallImage(path.join(dir, 'a.img'), 'scrub');
  const v1 = await backup(repo, img.path, 'vol');

  const [gone, altered] = await dataKeys(repo);
  await deleteObject(repo.bucket, gone!);
  const bytes = await getObject(repo.bucket, altered!);
  bytes[bytes.length - 20]! ^= 0x40;
  await putObject(repo.bucket, altered!, bytes);

  const r = await runCli(['scrub', ...repo.args, '--all', '--json']);
  t.is(r.code, 3, r.stderr);
  const report = JSON.parse(r.stdout) as { damaged: { checksum: string; reason: string }[]; invalidated_versions: string[] };
  t.deepEqual(report.damaged.map((d) => d.checksum).sort(), [gone!, altered!].map((k) => k.slice(k.lastIndexOf('/') + 1)).sort());
  t.deepEqual(report.invalidated_versions, [v1.id]);

  const v2 = await backup(repo, img.path, 'vol');
  t.is(v2.stats.blocks_written, 2, 'the damaged blocks are stored again');
  const healed = await runCli(['scrub', ...repo.args, '--all', '--json']);
  t.is(healed.code, 0, healed.stderr + healed.stdout);
  t.is(await restoreHash(repo, v1.id, path.join(dir, 'r1.img')), img.sha256);
});

test('errors are one clear line: endpoint down, wrong secret; AWS_* variables work without [s3] credentials', async (t) => {
  if (!gateway(t)) return;
  const dir = await tempDir(t);
  const repo = await s3Repo(t, dir);
  t.is((await init(repo, ['--create-bucket'])).code, 0, 'init');

  const down = await s3Repo(t, dir, { bucket: repo.bucket, prefix: repo.prefix, s3: { endpoint: 'http://127.0.0.1:1', retries: 1 } });
  const r1 = await runCli(['ls', ...down.args]);
  assertCliError(t, r1, 1, /^blocksafe: S3 endpoint http:\/\/127\.0\.0\.1:1 is not reachable: connect ECONNREFUSED 127\.0\.0\.1:1 \(2 attempts in [\d.]+ m?s\)/);

  const wrong = await s3Repo(t, dir, { bucket: repo.bucket, prefix: repo.prefix, s3: { secret_access_key: 'WRONG' } });
  const r2 = await runCli(['ls', ...wrong.args]);
  assertCliError(t, r2, 1, /refused GetObject backups\/blocksafe\/blocksafe\.json in bucket "[^"]+" \(SignatureDoesNotMatch\); check the access key and secret/);

  // Only the state directory in the config; endpoint, region and keys from the standard variables.
  const conf = path.join(dir, 'env.conf');
  await fs.writeFile(conf, `[s3]\nstate_dir = ${repo.stateDir}\nforce_path_style = true\n`);
  const env = { AWS_ENDPOINT_URL: S3_ENDPOINT, AWS_REGION: S3_REGION, AWS_ACCESS_KEY_ID: S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY: S3_SECRET_KEY };
  const ls = await runJson<VersionJson[]>(['ls', '--config', conf, '--repo', repo.url, '--key-file', repo.keyFile], { env });
  t.deepEqual(ls, [], 'the repository was opened: descriptor, key slots and keyring read with the credentials from the environment');
  const noBucket = await runCli(['ls', '--config', conf, '--repo', `s3://${repo.bucket}-missing/x`, '--key-file', repo.keyFile], { env });
  assertCliError(t, noBucket, 1, /S3 bucket "[^"]+-missing" does not exist/);
});

test('an S3 repository in a bucket created beforehand, at the bucket root', async (t) => {
  if (!gateway(t)) return;
  const dir = await tempDir(t);
  const repo = await s3Repo(t, dir, { prefix: '' });
  await createBucket(repo.bucket);
  const r = await runJson<{ location: string }>(['init', ...repo.args, '--block-size', '1M']);
  t.is(r.location, `s3://${repo.bucket}`);
  t.deepEqual(await listKeys(repo.bucket), ['blocksafe.json', 'keys/keyring', 'keys/slot-1.json']);
});

test('index rebuild of an S3 repository from the bucket alone (a new machine with an empty state directory)', async (t) => {
  if (!gateway(t)) return;
  const dir = await tempDir(t);
  const repo = await s3Repo(t, dir);
  await runOk(['init', ...repo.args, '--block-size', '1M', '--create-bucket']);
  const img = await smallImage(path.join(dir, 'a.img'), 'rebuild');
  const v = await backup(repo, img.path, 'vol', ['-t', 'offsite']);
  await runOk(['protect', ...repo.args, v.id]);
  // The "new machine": the local state directory (the LMDB index) is gone.
  await fs.rm(repo.stateDir, { recursive: true, force: true });
  // Any command fills the new index from the bucket's manifests (the index is a cache of the store).
  const listed = await runJson<VersionJson[]>(['ls', ...repo.args]);
  t.deepEqual(
    listed.map((x) => [x.id, x.protected, x.tags.includes('offsite')]),
    [[v.id, true, true]],
  );
  await fs.rm(repo.stateDir, { recursive: true, force: true });
  const r = await runJson<{ versions: number; missing_blocks: number }>(['index', 'rebuild', ...repo.args]);
  t.is(r.versions, 1);
  t.is(r.missing_blocks, 0);
  const shown = await runJson<VersionJson>(['show', ...repo.args, v.id]);
  t.true(shown.protected);
  t.true(shown.tags.includes('offsite'));
  t.is(await restoreHash(repo, v.id, path.join(dir, 'out.img')), img.sha256);
});

test('copy directory → S3 → another directory is byte-identical; a second copy sends nothing new', async (t) => {
  if (!gateway(t)) return;
  const dir = await tempDir(t);
  const bucketRepo = await s3Repo(t, dir);
  await runOk(['init', ...bucketRepo.args, '--block-size', '1M', '--create-bucket']);
  const usb = path.join(dir, 'usb');
  await runOk(['init', '--repo', usb, '--encryption', 'none', '--block-size', '1M']);
  const other = path.join(dir, 'other');
  await runOk(['init', '--repo', other, '--encryption', 'none', '--block-size', '1M']);
  const img = await smallImage(path.join(dir, 'a.img'), 'copy');
  const v = await runJson<VersionJson>(['backup', '--repo', usb, img.path, 'vol']);
  type Copied = { version: string; blocks_sent: number; already_there: boolean }[];
  // USB → S3 (the destination's [s3] settings come from the same --config).
  const toS3 = await runJson<Copied>(['copy', '--config', bucketRepo.conf, '--repo', usb, v.id, '--to', bucketRepo.url, '--to-key-file', bucketRepo.keyFile]);
  t.true(toS3[0]!.blocks_sent > 0);
  const objects = (await dataKeys(bucketRepo)).length;
  const again = await runJson<Copied>(['copy', '--config', bucketRepo.conf, '--repo', usb, v.id, '--to', bucketRepo.url, '--to-key-file', bucketRepo.keyFile]);
  t.true(again[0]!.already_there);
  t.is(again[0]!.blocks_sent, 0);
  t.is((await dataKeys(bucketRepo)).length, objects, 'nothing new in the bucket');
  // S3 → another directory, restored byte-identical.
  await runJson<Copied>(['copy', ...bucketRepo.args, v.id, '--to', other]);
  await runOk(['restore', '--repo', other, v.id, path.join(dir, 'out.img')]);
  t.is(await sha256File(path.join(dir, 'out.img')), img.sha256);
});

// ----------------------------------------------------------------------------------------------------
// Two machines sharing one S3 bucket (issue 13): two "hosts" are two state directories (two LMDB indexes)
// and two host identities (BLOCKSAFE_TEST_HOST gives each its own host name and boot id, so neither can
// judge the other's processes by pid). They see each other only through leases in the bucket (locks/) and
// the store's manifests and gc/generation. In this file, not its own: the serial test above stops the
// gateway, which must not happen while another file's test uses it.

const HOSTS_BS = 64 * 1024;
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
  const img = await makeImage(path.join(dir, 'vol.img'), { blockSize: HOSTS_BS, blocks: Array<BlockSpec>(160).fill('random'), seed: 'hosts' });

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
