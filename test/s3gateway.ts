/**
 * Fixtures of the S3 end-to-end tests: the Ceph RADOS Gateway that ../shared/services/radosgw/up.sh starts
 * (.ci/run starts it before the tests), an SDK client to look at and tamper with the bucket directly, and
 * stopping / restarting the radosgw daemon alone (the monitor and the memstore OSD keep the data).
 *
 * Environment: BLOCKSAFE_TEST_S3_ENDPOINT (default http://127.0.0.1:7480), BLOCKSAFE_TEST_S3_ACCESS_KEY /
 * BLOCKSAFE_TEST_S3_SECRET_KEY (TESTKEY / TESTSECRET), BLOCKSAFE_TEST_S3_REGION (us-east-1), and
 * BLOCKSAFE_TEST_RGW_DIR (up.sh's $D, default /tmp/blocksafe-rgw) for the stop/restart test.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { promisify } from 'node:util';
import type { ExecutionContext } from 'ava';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';
const sdk = await import('@aws-sdk/client-s3');
const execFileP = promisify(execFile);

export const S3_ENDPOINT = (process.env.BLOCKSAFE_TEST_S3_ENDPOINT || 'http://127.0.0.1:7480').replace(/\/+$/, '');
export const S3_ACCESS_KEY = process.env.BLOCKSAFE_TEST_S3_ACCESS_KEY || 'TESTKEY';
export const S3_SECRET_KEY = process.env.BLOCKSAFE_TEST_S3_SECRET_KEY || 'TESTSECRET';
export const S3_REGION = process.env.BLOCKSAFE_TEST_S3_REGION || 'us-east-1';
export const RGW_DIR = process.env.BLOCKSAFE_TEST_RGW_DIR || '/tmp/blocksafe-rgw';

export const HOW_TO_START =
  `start it with "bash ../shared/services/radosgw/up.sh" from the checkout (about 15 s; installs Debian's ceph packages when missing), ` +
  `or point BLOCKSAFE_TEST_S3_ENDPOINT (and BLOCKSAFE_TEST_S3_ACCESS_KEY / _SECRET_KEY) at a running gateway`;

export const s3 = new sdk.S3Client({
  endpoint: S3_ENDPOINT,
  region: S3_REGION,
  forcePathStyle: true,
  credentials: { accessKeyId: S3_ACCESS_KEY, secretAccessKey: S3_SECRET_KEY },
  requestChecksumCalculation: 'WHEN_REQUIRED',
  responseChecksumValidation: 'WHEN_REQUIRED',
  requestHandler: { connectionTimeout: 3000, requestTimeout: 30000, throwOnRequestTimeout: true },
});

/** True when something answers HTTP at the endpoint. */
export async function gatewayAnswers(timeoutMs = 3000): Promise<boolean> {
  try {
    await fetch(S3_ENDPOINT + '/', { signal: AbortSignal.timeout(timeoutMs) });
    return true;
  } catch {
    return false;
  }
}

/** Fails (does not skip) when the gateway is not there, saying how to start it. */
export async function requireGateway(): Promise<void> {
  if (!(await gatewayAnswers())) throw new Error(`No S3 gateway answers at ${S3_ENDPOINT}: ${HOW_TO_START}.`);
  try {
    await s3.send(new sdk.ListBucketsCommand({}));
  } catch (err) {
    throw new Error(`The S3 gateway at ${S3_ENDPOINT} refuses the test credentials (${(err as Error).name}: ${(err as Error).message}); ${HOW_TO_START}.`, { cause: err });
  }
}

const RUN = `${Date.now().toString(36)}${randomBytes(2).toString('hex')}`;
let bucketNo = 0;
/** A bucket name nobody used before (the bucket itself is not created). */
export function freshBucket(): string {
  return `bs-test-${RUN}-${++bucketNo}`;
}

export async function bucketExists(bucket: string): Promise<boolean> {
  try {
    await s3.send(new sdk.HeadBucketCommand({ Bucket: bucket }));
    return true;
  } catch (err) {
    if ((err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 404) return false;
    throw err;
  }
}

/** Every key under `prefix` (ListObjectsV2, all pages). */
export async function listKeys(bucket: string, prefix = ''): Promise<string[]> {
  const keys: string[] = [];
  let token: string | undefined;
  do {
    const page = await s3.send(new sdk.ListObjectsV2Command({ Bucket: bucket, Prefix: prefix || undefined, ContinuationToken: token }));
    for (const o of page.Contents ?? []) keys.push(o.Key!);
    token = page.IsTruncated ? page.NextContinuationToken : undefined;
  } while (token);
  return keys.sort();
}

export async function getObject(bucket: string, key: string): Promise<Buffer> {
  const out = await s3.send(new sdk.GetObjectCommand({ Bucket: bucket, Key: key }));
  return Buffer.from(await out.Body!.transformToByteArray());
}

export async function putObject(bucket: string, key: string, body: Buffer): Promise<void> {
  await s3.send(new sdk.PutObjectCommand({ Bucket: bucket, Key: key, Body: body }));
}

export async function deleteObject(bucket: string, key: string): Promise<void> {
  await s3.send(new sdk.DeleteObjectCommand({ Bucket: bucket, Key: key }));
}

export async function createBucket(bucket: string): Promise<void> {
  await s3.send(new sdk.CreateBucketCommand({ Bucket: bucket }));
}

/**
 * Empties a bucket (best effort: the gateway keeps its data in RAM). The empty bucket stays: after a
 * radosgw restart, DeleteBucket takes RGW some 25 s, and down.sh throws everything away anyway.
 */
export async function emptyBucket(bucket: string): Promise<void> {
  try {
    const keys = await listKeys(bucket);
    for (let i = 0; i < keys.length; i += 1000) {
      await s3.send(new sdk.DeleteObjectsCommand({ Bucket: bucket, Delete: { Objects: keys.slice(i, i + 1000).map((Key) => ({ Key })), Quiet: true } }));
    }
  } catch {
    // already gone, or the gateway is down: nothing to do
  }
}

export interface S3Repo {
  bucket: string;
  prefix: string;
  url: string;
  /** The --config file ([s3] settings for the gateway, plus extras). */
  conf: string;
  stateDir: string;
  keyFile: string;
  /** Global arguments of every command: --config, --repo, --key-file. */
  args: string[];
}

export interface S3RepoOptions {
  bucket?: string;
  prefix?: string;
  /** [pipeline] options (default: one worker thread, which is plenty for these small images and starts fast). */
  pipeline?: Record<string, string | number | boolean>;
  /** Overrides of [s3] options. */
  s3?: Record<string, string | number | boolean>;
}

/** Config file, key file and state directory of an S3 repository (not initialised). Its bucket is emptied at the end. */
export async function s3Repo(t: ExecutionContext, dir: string, opts: S3RepoOptions = {}): Promise<S3Repo> {
  const bucket = opts.bucket ?? freshBucket();
  const prefix = opts.prefix ?? 'backups/blocksafe';
  const stateDir = path.join(dir, 'state');
  await fs.mkdir(dir, { recursive: true });
  const s3opts: Record<string, string | number | boolean> = {
    endpoint: S3_ENDPOINT,
    region: S3_REGION,
    force_path_style: true,
    access_key_id: S3_ACCESS_KEY,
    secret_access_key: S3_SECRET_KEY,
    state_dir: stateDir,
    // fail fast when the gateway is away: 3 attempts within about a second
    retries: 2,
    retry_delay: '100ms',
    retry_max_delay: '1s',
    timeout: '20s',
    connect_timeout: '3s',
    ...opts.s3,
  };
  const conf = path.join(dir, `s3-${randomBytes(3).toString('hex')}.conf`);
  const pipeline = { threads: 1, ...opts.pipeline };
  const ini = (section: string, o: Record<string, unknown>) => [`[${section}]`, ...Object.entries(o).map(([k, v]) => `${k} = ${v}`), ''];
  await fs.writeFile(conf, [...ini('s3', s3opts), ...ini('pipeline', pipeline)].join('\n'), { mode: 0o600 });
  const keyFile = path.join(dir, 'repo.key');
  await fs.writeFile(keyFile, randomBytes(64), { mode: 0o600, flag: 'wx' }).catch((err) => {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  });
  if (!opts.bucket) t.teardown(() => emptyBucket(bucket));
  const url = prefix ? `s3://${bucket}/${prefix}` : `s3://${bucket}`;
  return { bucket, prefix, url, conf, stateDir, keyFile, args: ['--config', conf, '--repo', url, '--key-file', keyFile] };
}

// --------------------------------------------------------------------------- stopping the gateway

function rgwPidFile(): string {
  return path.join(RGW_DIR, 'run', 'client.rgw.a.pid');
}

async function rgwPid(): Promise<number | undefined> {
  try {
    const pid = Number((await fs.readFile(rgwPidFile(), 'utf8')).trim());
    process.kill(pid, 0);
    return pid;
  } catch {
    return undefined;
  }
}

/**
 * Stops the radosgw daemon alone (the monitor and the OSD keep the objects): SIGTERM, which closes the
 * endpoint at once; SIGKILL only if it lingers. (After a SIGKILL, RGW's first CreateBucket waits ~30 s for
 * leases of the killed instance, which would slow down the other tests.)
 */
export async function stopGateway(): Promise<void> {
  const pid = await rgwPid();
  if (pid === undefined) {
    throw new Error(`Cannot stop the gateway: no running radosgw in ${rgwPidFile()} (set BLOCKSAFE_TEST_RGW_DIR to the D that up.sh used).`);
  }
  process.kill(pid, 'SIGTERM');
  const alive = () => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  for (let i = 0; i < 300 && alive(); i++) await new Promise((r) => setTimeout(r, 50));
  if (alive()) process.kill(pid, 'SIGKILL');
  for (let i = 0; i < 100 && (await gatewayAnswers(500)); i++) await new Promise((r) => setTimeout(r, 50));
  if (await gatewayAnswers(500)) throw new Error('radosgw still answers after it was stopped');
}

/** Starts radosgw again with up.sh's configuration and waits until it answers. */
export async function startGateway(): Promise<void> {
  if (await gatewayAnswers(1000)) return;
  await execFileP('radosgw', ['-c', path.join(RGW_DIR, 'ceph.conf'), '-n', 'client.rgw.a']);
  for (let i = 0; i < 300; i++) {
    if (await gatewayAnswers(1000)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`radosgw did not come back at ${S3_ENDPOINT} within 30 s (see ${RGW_DIR}/log/client.rgw.a.log)`);
}
