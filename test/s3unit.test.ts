/**
 * Unit tests of the S3 store's request discipline with a fake S3 client (no gateway needed): backoff and
 * jitter, which failures are retried, per-request timeouts, the concurrency bound, batched deletes with
 * key-level retries, paginated listings, the one-line errors, settings from config and AWS_* variables.
 * The end-to-end tests against the real Ceph RADOS Gateway are in s3.test.ts.
 */
import test from 'ava';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { BlocksafeError, NotFoundError } from '../src/errors.js';
import { parseS3Url, s3Settings, S3Store, defaultStateDir, type S3Api, type S3Settings } from '../src/store/s3.js';
import { AttemptTimeout, backoffDelay, classifyFailure, RetriesExhausted, Semaphore, withRetries, type RetryPolicy } from '../src/store/s3retry.js';
import { waitFor } from './cliHarness.js';
import { runCli, tempDir } from './helpers.js';

const FAST: RetryPolicy = { retries: 3, baseDelayMs: 1, maxDelayMs: 4, timeoutMs: 1000 };

function settings(over: Partial<S3Settings> = {}): S3Settings {
  return {
    endpoint: 'http://fake.invalid:9',
    region: 'us-east-1',
    forcePathStyle: true,
    credentials: { accessKeyId: 'k', secretAccessKey: 's' },
    stateDir: '/tmp/unused',
    concurrency: 4,
    policy: FAST,
    connectTimeoutMs: 1000,
    deleteBatch: 1000,
    listPage: 1000,
    uploadLimit: 0,
    downloadLimit: 0,
    ...over,
  };
}

const sdkError = (name: string, status?: number, extra: Record<string, unknown> = {}) =>
  Object.assign(new Error(`${name} happened`), { name, ...(status ? { $metadata: { httpStatusCode: status } } : {}), ...extra });
const netError = (code: string) => Object.assign(new Error(`connect ${code} 10.0.0.1:9`), { code });

/** The fields of the SDK commands' inputs that the fake and the tests read (each command sets its own). */
interface Input {
  Bucket: string;
  Key: string;
  Body: Uint8Array;
  ContentMD5?: string;
  Prefix?: string;
  ContinuationToken?: string;
  MaxKeys: number;
  Delete: { Objects: { Key: string }[] };
  CreateBucketConfiguration?: { LocationConstraint?: string };
}
type Handler = (input: Input, signal?: AbortSignal) => unknown;

/** A fake S3 client: an in-memory bucket plus per-command overrides; records every call. */
class FakeS3 implements S3Api {
  readonly objects = new Map<string, Buffer>();
  readonly calls: { cmd: string; input: Input }[] = [];
  readonly handlers: Record<string, Handler> = {};
  inFlight = 0;
  maxInFlight = 0;
  destroyed = false;

  async send(command: unknown, options?: { abortSignal?: AbortSignal }): Promise<unknown> {
    const cmd = String((command as object).constructor.name).replace(/Command$/, '');
    const input = (command as { input: Input }).input;
    this.calls.push({ cmd, input });
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await new Promise((r) => setTimeout(r, 2));
      const h = this.handlers[cmd];
      if (h) {
        const out = await h(input, options?.abortSignal);
        if (out !== undefined) return out;
      }
      return this.builtin(cmd, input);
    } finally {
      this.inFlight--;
    }
  }

  private builtin(cmd: string, input: Input): unknown {
    switch (cmd) {
      case 'HeadBucket':
        return {};
      case 'PutObject':
        this.objects.set(input.Key, Buffer.from(input.Body));
        return {};
      case 'GetObject': {
        const o = this.objects.get(input.Key);
        if (!o) throw sdkError('NoSuchKey', 404);
        return { Body: Readable.from([o]), ContentLength: o.length };
      }
      case 'HeadObject': {
        const o = this.objects.get(input.Key);
        if (!o) throw sdkError('NotFound', 404);
        return { ContentLength: o.length };
      }
      case 'DeleteObjects':
        for (const { Key } of input.Delete.Objects) this.objects.delete(Key);
        return {};
      case 'ListObjectsV2': {
        const keys = [...this.objects.keys()].filter((k) => k.startsWith(input.Prefix ?? '')).sort();
        const start = input.ContinuationToken ? Number(input.ContinuationToken) : 0;
        const page = keys.slice(start, start + input.MaxKeys);
        const more = start + page.length < keys.length;
        return { Contents: page.map((Key) => ({ Key })), IsTruncated: more, NextContinuationToken: more ? String(start + page.length) : undefined };
      }
      default:
        throw new Error(`fake: unexpected ${cmd}`);
    }
  }

  count(cmd: string): number {
    return this.calls.filter((c) => c.cmd === cmd).length;
  }

  destroy(): void {
    this.destroyed = true;
  }
}

function fakeStore(fake: FakeS3, over: Partial<S3Settings> = {}, url = 's3://bucket/repo/one'): S3Store {
  return S3Store.fromUrl(url, settings(over), fake);
}

// ------------------------------------------------------------------------------------------- pure logic

test('backoff grows exponentially, is capped, and is jittered within [d/2, d]', (t) => {
  const p = { baseDelayMs: 100, maxDelayMs: 1000 };
  t.is(
    backoffDelay(0, p, () => 1),
    100,
  );
  t.is(
    backoffDelay(0, p, () => 0),
    50,
  );
  t.is(
    backoffDelay(1, p, () => 1),
    200,
  );
  t.is(
    backoffDelay(3, p, () => 1),
    800,
  );
  t.is(
    backoffDelay(4, p, () => 1),
    1000,
    'capped',
  );
  t.is(
    backoffDelay(40, p, () => 0),
    500,
    'capped, with jitter',
  );
  const seen = new Set(Array.from({ length: 50 }, () => backoffDelay(2, p)));
  t.true(seen.size > 10, 'random jitter');
  for (const d of seen) t.true(d >= 200 && d <= 400);
});

test('transient failures are retried, others are not', (t) => {
  for (const e of [
    sdkError('InternalError', 500),
    sdkError('ServiceUnavailable', 503),
    sdkError('SlowDown', 503),
    sdkError('Whatever', 502),
    sdkError('TooManyRequestsException', 429),
    sdkError('RequestTimeout', 400),
    sdkError('Throttling', 400),
  ]) {
    t.is(classifyFailure(e), 'service', e.name);
  }
  for (const code of ['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN']) t.is(classifyFailure(netError(code)), 'network', code);
  t.is(classifyFailure(Object.assign(new Error('socket hang up'), {})), 'network');
  t.is(classifyFailure(Object.assign(new Error('outer'), { cause: netError('ECONNRESET') })), 'network', 'cause chain');
  t.is(classifyFailure(new AttemptTimeout(10)), 'timeout');
  t.is(classifyFailure(sdkError('TimeoutError')), 'timeout');
  for (const e of [sdkError('AccessDenied', 403), sdkError('NoSuchBucket', 404), sdkError('NoSuchKey', 404), sdkError('InvalidArgument', 400), new Error('plain bug')]) {
    t.is(classifyFailure(e), 'fatal', e.name);
  }
});

test('withRetries: succeeds after transient errors, gives up after the configured retries, never retries fatal ones', async (t) => {
  let n = 0;
  const retried: string[] = [];
  const v = await withRetries(
    FAST,
    async () => {
      if (++n < 3) throw sdkError('SlowDown', 503);
      return 'ok';
    },
    { onRetry: (i) => retried.push(`${i.attempt}:${i.kind}`) },
  );
  t.is(v, 'ok');
  t.is(n, 3);
  t.deepEqual(retried, ['1:service', '2:service']);

  n = 0;
  const e = await t.throwsAsync(
    withRetries(FAST, async () => {
      n++;
      throw netError('ECONNRESET');
    }),
  );
  t.true(e instanceof RetriesExhausted);
  t.is((e as RetriesExhausted).attempts, FAST.retries + 1);
  t.is((e as RetriesExhausted).kind, 'network');
  t.is(n, FAST.retries + 1);

  n = 0;
  const f = await t.throwsAsync(
    withRetries(FAST, async () => {
      n++;
      throw sdkError('AccessDenied', 403);
    }),
  );
  t.is(n, 1);
  t.is((f as RetriesExhausted).kind, 'fatal');
});

test('withRetries: a hanging request is aborted by the per-request timeout and retried', async (t) => {
  let n = 0;
  let aborted = 0;
  const v = await withRetries({ ...FAST, timeoutMs: 40 }, (signal) => {
    n++;
    if (n === 1) {
      return new Promise((_, reject) => signal.addEventListener('abort', () => (aborted++, reject(Object.assign(new Error('aborted'), { name: 'AbortError' })))));
    }
    if (n === 2) return new Promise(() => undefined); // ignores its signal altogether
    return Promise.resolve(42);
  });
  t.is(v, 42);
  t.is(n, 3);
  t.is(aborted, 1);
  const e = await t.throwsAsync(withRetries({ ...FAST, retries: 1, timeoutMs: 20 }, () => new Promise(() => undefined)));
  t.is((e as RetriesExhausted).kind, 'timeout');
  t.true((e as RetriesExhausted).last instanceof AttemptTimeout);
});

test('semaphore: never more holders than the limit, served in order', async (t) => {
  const s = new Semaphore(2);
  let active = 0;
  let max = 0;
  const order: number[] = [];
  await Promise.all(
    Array.from({ length: 8 }, async (_, i) => {
      await s.acquire();
      active++;
      max = Math.max(max, active);
      order.push(i);
      await new Promise((r) => setTimeout(r, 5));
      active--;
      s.release();
    }),
  );
  t.is(max, 2);
  t.deepEqual(order, [0, 1, 2, 3, 4, 5, 6, 7]);
  t.is(s.inUse, 0);
});

// ------------------------------------------------------------------------------------- store on a fake

test('store: objects live under the prefix; put/get/has/size/list; NoSuchKey is "missing"', async (t) => {
  const fake = new FakeS3();
  const store = fakeStore(fake);
  t.is(store.location, 's3://bucket/repo/one');
  await store.put('data/ab/abcd', Buffer.from('hello'));
  await store.put('blocksafe.json', Buffer.from('{}'));
  t.deepEqual([...fake.objects.keys()].sort(), ['repo/one/blocksafe.json', 'repo/one/data/ab/abcd']);
  const put = fake.calls.find((c) => c.cmd === 'PutObject')!.input;
  t.is(put.ContentMD5, 'XUFAKrxLKna5cZ2REBfFkg==', 'Content-MD5 lets the server reject a corrupted upload');
  t.is((await store.get('data/ab/abcd')).toString(), 'hello');
  t.is(await store.tryGet('data/ab/nope'), undefined);
  await t.throwsAsync(store.get('data/ab/nope'), { instanceOf: NotFoundError });
  t.is(await store.size('data/ab/abcd'), 5);
  t.true(await store.has('blocksafe.json'));
  t.false(await store.has('nope'));
  const names: string[] = [];
  for await (const n of store.list('')) names.push(n.name);
  t.deepEqual(names.sort(), ['blocksafe.json', 'data/ab/abcd']);
  const data: string[] = [];
  for await (const n of store.list('data/')) data.push(n.name);
  t.deepEqual(data, ['data/ab/abcd']);
  t.is(fake.calls.find((c) => c.cmd === 'ListObjectsV2' && c.input.Prefix === 'repo/one/data/')?.cmd, 'ListObjectsV2');
  await store.close();
  t.true(fake.destroyed);
});

test('store: a missing object is told apart from a missing bucket', async (t) => {
  const fake = new FakeS3();
  fake.handlers.HeadBucket = () => {
    throw sdkError('NotFound', 404);
  };
  fake.handlers.HeadObject = () => {
    throw sdkError('NotFound', 404);
  };
  const store = fakeStore(fake);
  const e = await t.throwsAsync(store.has('blocksafe.json'), { instanceOf: NotFoundError });
  t.regex(e!.message, /S3 bucket "bucket" does not exist at http:\/\/fake\.invalid:9; .*init --create-bucket/);
  fake.handlers.GetObject = () => {
    throw sdkError('NoSuchBucket', 404);
  };
  await t.throwsAsync(store.tryGet('x'), { instanceOf: NotFoundError, message: /does not exist/ });
});

test('store: transient errors of puts and gets are retried with backoff', async (t) => {
  const fake = new FakeS3();
  let puts = 0;
  fake.handlers.PutObject = () => {
    puts++;
    if (puts === 1) throw sdkError('SlowDown', 503);
    if (puts === 2) throw netError('ECONNRESET');
    if (puts === 3) throw sdkError('InternalError', 500);
  };
  let gets = 0;
  fake.handlers.GetObject = () => {
    if (++gets === 1) return { Body: Readable.from([Buffer.from('hel')]), ContentLength: 5 }; // cut short
    return undefined;
  };
  const store = fakeStore(fake);
  await store.put('k', Buffer.from('hello'));
  t.is(puts, 4);
  t.is((await store.get('k')).toString(), 'hello');
  t.is(gets, 2, 'a truncated body is retried');
});

test('store: an endpoint that is down gives one clear error after the retries', async (t) => {
  const fake = new FakeS3();
  fake.handlers.PutObject = () => {
    throw netError('ECONNREFUSED');
  };
  const store = fakeStore(fake, { policy: { ...FAST, retries: 2 } });
  const e = await t.throwsAsync(store.put('k', Buffer.from('x')), { instanceOf: BlocksafeError });
  t.regex(e!.message, /^S3 endpoint http:\/\/fake\.invalid:9 is not reachable: connect ECONNREFUSED 10\.0\.0\.1:9 \(3 attempts in [\d.]+ m?s\); /);
  t.false(e!.message.includes('\n'));
  t.is(fake.count('PutObject'), 3);

  const slow = new FakeS3();
  slow.handlers.GetObject = () => new Promise(() => undefined);
  const s2 = fakeStore(slow, { policy: { ...FAST, retries: 1, timeoutMs: 30 } });
  const e2 = await t.throwsAsync(s2.get('k'));
  t.regex(e2!.message, /is not reachable: no answer within 30 ms \(2 attempts/);

  const denied = new FakeS3();
  denied.handlers.GetObject = () => {
    throw sdkError('SignatureDoesNotMatch', 403);
  };
  const e3 = await t.throwsAsync(fakeStore(denied).get('k'));
  t.regex(e3!.message, /refused GetObject repo\/one\/k in bucket "bucket" \(SignatureDoesNotMatch\); check the access key and secret/);
  t.is(denied.count('GetObject'), 1, 'not retried');
});

test('store: requests in flight are bounded by concurrency', async (t) => {
  const fake = new FakeS3();
  fake.handlers.PutObject = () => new Promise((r) => setTimeout(() => r(undefined), 10));
  const store = fakeStore(fake, { concurrency: 3 });
  await Promise.all(Array.from({ length: 30 }, (_, i) => store.put(`data/${i}`, Buffer.alloc(10))));
  t.is(fake.objects.size, 30);
  t.is(fake.maxInFlight, 3);
});

test('store: deletes go in batches of at most 1000 keys; failed keys of a batch are retried', async (t) => {
  const fake = new FakeS3();
  const store = fakeStore(fake);
  const names = Array.from({ length: 2500 }, (_, i) => `data/${String(i).padStart(5, '0')}`);
  for (const n of names) fake.objects.set(store.key(n), Buffer.alloc(1));
  fake.objects.set(store.key('keep'), Buffer.alloc(1));
  let failedOnce = false;
  let timedOut = false;
  fake.handlers.DeleteObjects = (input) => {
    const keys: string[] = input.Delete.Objects.map((o: { Key: string }) => o.Key);
    if (!timedOut && keys.length === 500) {
      timedOut = true; // the whole request times out once (backy2's cleanup died on this)
      throw sdkError('RequestTimeout', 400);
    }
    if (!failedOnce && keys.includes(store.key('data/01500'))) {
      failedOnce = true;
      for (const k of keys) if (k !== store.key('data/01500') && k !== store.key('data/01501')) fake.objects.delete(k);
      return {
        Errors: [
          { Key: store.key('data/01500'), Code: 'InternalError', Message: 'try again' },
          { Key: store.key('data/01501'), Code: 'SlowDown' },
        ],
      };
    }
    return undefined;
  };
  await store.delete(names);
  const sizes = fake.calls.filter((c) => c.cmd === 'DeleteObjects').map((c) => c.input.Delete.Objects.length);
  t.true(sizes.every((n) => n <= 1000));
  t.deepEqual(
    [...sizes].sort((a, b) => a - b),
    [2, 500, 500, 1000, 1000],
    'three batches, one retried whole, one retried for its 2 failed keys',
  );
  t.deepEqual([...fake.objects.keys()], [store.key('keep')]);

  const smallFake = new FakeS3();
  const small = fakeStore(smallFake, { deleteBatch: 7 });
  await small.delete(Array.from({ length: 20 }, (_, i) => `x${i}`));
  t.deepEqual(
    smallFake.calls.filter((c) => c.cmd === 'DeleteObjects').map((c) => c.input.Delete.Objects.length),
    [7, 7, 6],
    'a configured batch size is honoured',
  );
});

test('store: a delete refused for a key is an error, not retried', async (t) => {
  const fake = new FakeS3();
  fake.handlers.DeleteObjects = (input) => ({ Errors: [{ Key: input.Delete.Objects[0]!.Key, Code: 'AccessDenied', Message: 'no' }] });
  const store = fakeStore(fake);
  const e = await t.throwsAsync(store.delete(['a', 'b']));
  t.regex(e!.message, /refused DeleteObjects/);
  t.is(fake.count('DeleteObjects'), 1);
});

test('store: listings are paginated with continuation tokens', async (t) => {
  const fake = new FakeS3();
  const store = fakeStore(fake, { listPage: 100 }, 's3://bucket');
  for (let i = 0; i < 345; i++) fake.objects.set(`data/${i}`, Buffer.alloc(1));
  let listed = 0;
  for await (const _ of store.list('data/')) listed++;
  t.is(listed, 345);
  t.is(fake.count('ListObjectsV2'), 4);
  t.true(fake.calls.filter((c) => c.cmd === 'ListObjectsV2').every((c) => c.input.MaxKeys === 100));
});

test('store: close() stops requests that wait for a retry', async (t) => {
  const fake = new FakeS3();
  fake.handlers.PutObject = () => {
    throw sdkError('ServiceUnavailable', 503);
  };
  // A 10-minute backoff: were it waited out, the test would time out instead of passing.
  const store = fakeStore(fake, { policy: { retries: 10, baseDelayMs: 600_000, maxDelayMs: 600_000, timeoutMs: 1000 } });
  const p = store.put('k', Buffer.from('x'));
  await waitFor('the first attempt to fail', () => (fake.count('PutObject') === 1 && fake.inFlight === 0 ? true : undefined), 60_000, 5);
  await store.close();
  await t.throwsAsync(p, { message: /closed/ });
  t.is(fake.count('PutObject'), 1, 'no retry after close()');
});

test('init --create-bucket creates a missing bucket once and never an existing one', async (t) => {
  const fake = new FakeS3();
  let exists = false;
  fake.handlers.HeadBucket = () => {
    if (!exists) throw sdkError('NotFound', 404);
  };
  fake.handlers.CreateBucket = () => {
    exists = true;
    return {};
  };
  const store = fakeStore(fake);
  await t.throwsAsync(store.ensureBucket(false), { instanceOf: NotFoundError });
  t.is(fake.count('CreateBucket'), 0);
  t.true(await store.ensureBucket(true));
  t.is(fake.count('CreateBucket'), 1);
  t.is(fake.calls.find((c) => c.cmd === 'CreateBucket')!.input.CreateBucketConfiguration, undefined, 'no LocationConstraint in us-east-1');
  t.false(await store.ensureBucket(true));
  t.is(fake.count('CreateBucket'), 1, 'an existing bucket is not created again');

  const eu = new FakeS3();
  eu.handlers.HeadBucket = () => {
    throw sdkError('NotFound', 404);
  };
  eu.handlers.CreateBucket = () => ({});
  await fakeStore(eu, { region: 'eu-central-1' }).ensureBucket(true);
  t.deepEqual(eu.calls.find((c) => c.cmd === 'CreateBucket')!.input.CreateBucketConfiguration, { LocationConstraint: 'eu-central-1' });
});

// ------------------------------------------------------------------------------------------- settings

test('s3:// addresses', (t) => {
  t.deepEqual(parseS3Url('s3://bucket'), { bucket: 'bucket', prefix: '' });
  t.deepEqual(parseS3Url('s3://bucket/'), { bucket: 'bucket', prefix: '' });
  t.deepEqual(parseS3Url('s3://my.bucket-1/a/b/'), { bucket: 'my.bucket-1', prefix: 'a/b' });
  t.throws(() => parseS3Url('s3:///prefix'), { message: /not a valid bucket name/ });
  t.throws(() => parseS3Url('s3://bkt/../x'), { message: /"\.\."/ });
});

test('settings: [s3] options first, then the standard AWS_* variables', async (t) => {
  const env = { AWS_ENDPOINT_URL: 'http://env:1', AWS_REGION: 'eu-west-3', HOME: '/home/u' };
  const fromEnv = s3Settings({}, env);
  t.is(fromEnv.endpoint, 'http://env:1');
  t.is(fromEnv.region, 'eu-west-3');
  t.is(fromEnv.credentials, undefined, 'the SDK chain reads AWS_ACCESS_KEY_ID etc.');
  t.is(s3Settings({}, { ...env, AWS_ENDPOINT_URL_S3: 'http://s3only:2' }).endpoint, 'http://s3only:2');
  const fromCfg = s3Settings({ endpoint: 'http://cfg:3/', region: 'r1', access_key_id: 'A', secret_access_key: 'S', retries: 2, timeout: 5000 }, env);
  t.is(fromCfg.endpoint, 'http://cfg:3');
  t.is(fromCfg.region, 'r1');
  t.deepEqual(fromCfg.credentials, { accessKeyId: 'A', secretAccessKey: 'S' });
  t.is(fromCfg.policy.retries, 2);
  t.is(fromCfg.policy.timeoutMs, 5000);
  t.is(s3Settings({}, {}).region, 'us-east-1');
  t.throws(() => s3Settings({ endpoint: 'ftp://x' }, {}), { message: /not an http/ });
  t.throws(() => s3Settings({ access_key_id: 'A' }, {}), { message: /both/ });

  const dir = await tempDir(t);
  const file = path.join(dir, 'credentials');
  await fs.writeFile(file, '[default]\naws_access_key_id = DK\naws_secret_access_key = DS\n\n[backup]\naws_access_key_id = BK\naws_secret_access_key = BS\n');
  t.deepEqual(s3Settings({ credentials_file: file }, {}).credentials, { accessKeyId: 'DK', secretAccessKey: 'DS' });
  t.deepEqual(s3Settings({ credentials_file: file, profile: 'backup' }, {}).credentials, { accessKeyId: 'BK', secretAccessKey: 'BS' });
  t.deepEqual(s3Settings({ credentials_file: file }, { AWS_PROFILE: 'backup' }).credentials, { accessKeyId: 'BK', secretAccessKey: 'BS' });
  t.throws(() => s3Settings({ credentials_file: file, profile: 'nope' }, {}), { message: /no \[nope\] profile/ });

  t.is(defaultStateDir({ HOME: '/home/u' }, 0), '/var/lib/blocksafe');
  t.is(defaultStateDir({ HOME: '/home/u' }, 1000), '/home/u/.local/state/blocksafe');
  t.is(defaultStateDir({ HOME: '/home/u', XDG_STATE_HOME: '/xdg' }, 1000), '/xdg/blocksafe');
});

test('blocksafe config never prints the S3 secret key', async (t) => {
  const dir = await tempDir(t);
  const conf = path.join(dir, 'c.conf');
  await fs.writeFile(conf, '[s3]\nendpoint = http://127.0.0.1:7480\nforce_path_style = true\naccess_key_id = TESTKEY\nsecret_access_key = VERY-SECRET-VALUE\nretries = 3\ntimeout = 5s\n');
  const text = await runCli(['--config', conf, 'config']);
  t.is(text.code, 0, text.stderr);
  t.false(text.stdout.includes('VERY-SECRET-VALUE'));
  t.regex(text.stdout, /secret_access_key = \*{8}/);
  t.regex(text.stdout, /force_path_style = true/);
  t.regex(text.stdout, /access_key_id = TESTKEY/);
  const json = await runCli(['--config', conf, 'config', '--json']);
  t.is(json.code, 0, json.stderr);
  t.false(json.stdout.includes('VERY-SECRET-VALUE'));
  t.is(JSON.parse(json.stdout).config.s3.secret_access_key, '********');
  t.is(JSON.parse(json.stdout).config.s3.timeout, 5000);
});
