import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import ini from 'ini';
import { BlocksafeError, NotFoundError, UsageError } from '../errors.js';
import { Throttle } from '../util/throttle.js';
import { checkObjectName, type BlobStore, type ListOptions, type ObjectInfo } from './blobstore.js';
import { classifyFailure, formatMs, httpStatus, RetriesExhausted, Semaphore, StoreClosed, withRetries, type FailureKind, type RetryPolicy } from './s3retry.js';

/**
 * Blob store in an S3-compatible bucket (AWS, Ceph RADOS Gateway, MinIO, …): the same object names as the
 * directory store, under `s3://BUCKET/PREFIX/`. A completed PUT is durable and atomic, so `sync()` has
 * nothing to do. Every request goes through one discipline (see s3retry.ts): at most `concurrency` in
 * flight, a per-request timeout, and retries with exponential backoff and jitter on transient failures.
 * The LMDB index of an S3 repository lives locally, in `state_dir/<repository id>`.
 *
 * The AWS SDK is loaded on first use only (it takes half a second to import), so directory repositories
 * do not pay for it.
 */

type Sdk = typeof import('@aws-sdk/client-s3');

/** The part of the SDK client the store uses (a fake implements it in tests). */
export interface S3Api {
  send(command: unknown, options?: { abortSignal?: AbortSignal }): Promise<unknown>;
  destroy(): void;
}

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface S3Settings {
  /** Explicit endpoint URL, or undefined for AWS itself. */
  endpoint: string | undefined;
  region: string;
  forcePathStyle: boolean;
  /** Undefined: the SDK's standard chain (AWS_ACCESS_KEY_ID…, AWS_PROFILE, ~/.aws/credentials, …). */
  credentials: S3Credentials | undefined;
  /** Parent of the per-repository index directories. */
  stateDir: string;
  concurrency: number;
  policy: RetryPolicy;
  connectTimeoutMs: number;
  deleteBatch: number;
  listPage: number;
  /** Bytes per second, 0 = unlimited. */
  uploadLimit: number;
  downloadLimit: number;
  /** Log retries on stderr. */
  debug?: boolean;
}

/** The [s3] section of the configuration (see SCHEMA in config.ts). */
export interface S3Config {
  endpoint: string;
  region: string;
  force_path_style: boolean;
  access_key_id: string;
  secret_access_key: string;
  credentials_file: string;
  profile: string;
  state_dir: string;
  concurrency: number;
  timeout: number;
  connect_timeout: number;
  retries: number;
  retry_delay: number;
  retry_max_delay: number;
  delete_batch: number;
  list_page: number;
  upload_limit: number;
  download_limit: number;
}

export const S3_DEFAULTS: S3Config = {
  endpoint: '',
  region: '',
  force_path_style: false,
  access_key_id: '',
  secret_access_key: '',
  credentials_file: '',
  profile: '',
  state_dir: '',
  concurrency: 8,
  timeout: 60_000,
  connect_timeout: 10_000,
  retries: 5,
  retry_delay: 200,
  retry_max_delay: 20_000,
  delete_batch: 1000,
  list_page: 1000,
  upload_limit: 0,
  download_limit: 0,
};

// ------------------------------------------------------------------------------------------ locations

export interface S3Location {
  bucket: string;
  /** Without leading or trailing '/'; '' for the bucket's root. */
  prefix: string;
}

/** Parses `s3://BUCKET/PREFIX` (the prefix may be empty or have several levels). */
export function parseS3Url(url: string): S3Location {
  const m = /^s3:\/\/([^/]*)(?:\/(.*))?$/.exec(url);
  if (!m) throw new UsageError(`"${url}" is not an S3 repository address; use s3://BUCKET/PREFIX.`);
  const bucket = m[1]!;
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$/.test(bucket)) {
    throw new UsageError(`"${bucket}" in ${url} is not a valid bucket name (use s3://BUCKET/PREFIX with a name of 3-63 lower-case letters, digits, dots and hyphens).`);
  }
  const prefix = (m[2] ?? '').replace(/^\/+|\/+$/g, '').replace(/\/{2,}/g, '/');
  if (prefix.split('/').some((p) => p === '.' || p === '..')) throw new UsageError(`The prefix of ${url} must not contain "." or ".." parts.`);
  return { bucket, prefix };
}

/** Default state directory: /var/lib/blocksafe for root, else $XDG_STATE_HOME/blocksafe or ~/.local/state/blocksafe. */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env, uid: number | undefined = process.getuid?.()): string {
  if (uid === 0) return '/var/lib/blocksafe';
  if (env.XDG_STATE_HOME && path.isAbsolute(env.XDG_STATE_HOME)) return path.join(env.XDG_STATE_HOME, 'blocksafe');
  return path.join(env.HOME || homedir(), '.local', 'state', 'blocksafe');
}

/** Reads one profile of a file in AWS credentials format. */
export function readCredentialsFile(file: string, profile: string): S3Credentials {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new UsageError(`S3 credentials file ${file} cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); check [s3] credentials_file.`);
  }
  const parsed = ini.parse(text) as Record<string, unknown>;
  const section = (parsed[profile] ?? parsed[`profile ${profile}`]) as Record<string, unknown> | undefined;
  if (!section || typeof section !== 'object') {
    throw new UsageError(`S3 credentials file ${file} has no [${profile}] profile; set [s3] profile or add it.`);
  }
  const id = section.aws_access_key_id;
  const secret = section.aws_secret_access_key;
  if (typeof id !== 'string' || typeof secret !== 'string' || !id || !secret) {
    throw new UsageError(`Profile [${profile}] of S3 credentials file ${file} needs aws_access_key_id and aws_secret_access_key.`);
  }
  const token = section.aws_session_token;
  return { accessKeyId: id.trim(), secretAccessKey: secret.trim(), ...(typeof token === 'string' && token ? { sessionToken: token.trim() } : {}) };
}

/** Resolves the [s3] configuration and the standard AWS_* environment variables into store settings. */
export function s3Settings(cfg: Partial<S3Config> = {}, env: NodeJS.ProcessEnv = process.env): S3Settings {
  const c: S3Config = { ...S3_DEFAULTS, ...cfg };
  const endpoint = c.endpoint || env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL || undefined;
  if (endpoint !== undefined) {
    let u: URL | undefined;
    try {
      u = new URL(endpoint);
    } catch {
      u = undefined;
    }
    if (!u || !/^https?:$/.test(u.protocol)) throw new UsageError(`S3 endpoint "${endpoint}" is not an http:// or https:// URL; check [s3] endpoint (or AWS_ENDPOINT_URL).`);
  }
  const region = c.region || env.AWS_REGION || env.AWS_DEFAULT_REGION || 'us-east-1';
  let credentials: S3Credentials | undefined;
  if (c.access_key_id || c.secret_access_key) {
    if (!c.access_key_id || !c.secret_access_key) throw new UsageError('Set both [s3] access_key_id and secret_access_key, or neither.');
    credentials = { accessKeyId: c.access_key_id, secretAccessKey: c.secret_access_key };
  } else if (c.credentials_file) {
    credentials = readCredentialsFile(c.credentials_file, c.profile || env.AWS_PROFILE || 'default');
  }
  return {
    endpoint: endpoint?.replace(/\/+$/, ''),
    region,
    forcePathStyle: c.force_path_style,
    credentials,
    stateDir: path.resolve(c.state_dir || defaultStateDir(env)),
    concurrency: Math.max(1, c.concurrency),
    policy: { retries: Math.max(0, c.retries), baseDelayMs: Math.max(1, c.retry_delay), maxDelayMs: Math.max(c.retry_delay, c.retry_max_delay), timeoutMs: c.timeout },
    connectTimeoutMs: c.connect_timeout,
    deleteBatch: Math.min(1000, Math.max(1, c.delete_batch)),
    listPage: Math.min(1000, Math.max(1, c.list_page)),
    uploadLimit: c.upload_limit,
    downloadLimit: c.download_limit,
    debug: !!env.BLOCKSAFE_S3_DEBUG,
  };
}

// ---------------------------------------------------------------------------------------------- store

const SILENT = { trace() {}, debug() {}, info() {}, warn() {}, error() {} };

let sdkModule: Promise<Sdk> | undefined;
function loadSdk(): Promise<Sdk> {
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  sdkModule ??= import('@aws-sdk/client-s3');
  return sdkModule;
}

/**
 * node:http and node:https, loaded with the SDK: importing them statically costs every command ~0.1 s (their
 * ESM facades read every export, and one of them loads undici).
 */
let httpModules: Promise<[typeof import('node:http'), typeof import('node:https')]> | undefined;
function loadHttp() {
  httpModules ??= Promise.all([import('node:http'), import('node:https')]);
  return httpModules;
}

export class S3Store implements BlobStore {
  readonly location: string;
  /** The endpoint as shown in messages. */
  readonly endpointLabel: string;
  private readonly keyPrefix: string;
  private readonly closed = new AbortController();
  private readonly semaphore: Semaphore;
  private readonly uploads: Throttle;
  private readonly downloads: Throttle;
  private connection?: Promise<{ client: S3Api; sdk: Sdk }>;
  private bucketChecked = false;

  /** `client` replaces the SDK client (tests). */
  constructor(
    readonly bucket: string,
    readonly prefix: string,
    readonly settings: S3Settings,
    private readonly fakeClient?: S3Api,
  ) {
    this.location = `s3://${bucket}${prefix ? `/${prefix}` : ''}`;
    this.keyPrefix = prefix ? `${prefix}/` : '';
    this.endpointLabel = settings.endpoint ?? `https://s3.${settings.region}.amazonaws.com`;
    this.semaphore = new Semaphore(settings.concurrency);
    this.uploads = new Throttle(settings.uploadLimit);
    this.downloads = new Throttle(settings.downloadLimit);
  }

  static fromUrl(url: string, settings: S3Settings, client?: S3Api): S3Store {
    const { bucket, prefix } = parseS3Url(url);
    return new S3Store(bucket, prefix, settings, client);
  }

  /** Where the LMDB index of the repository with this id lives. */
  indexDir(id: string): string {
    return path.join(this.settings.stateDir, id);
  }

  key(name: string): string {
    return this.keyPrefix + checkObjectName(name);
  }

  private connect(): Promise<{ client: S3Api; sdk: Sdk }> {
    this.connection ??= Promise.all([loadSdk(), loadHttp()]).then(([sdk, [http, https]]) => {
      const s = this.settings;
      const agentOptions = { keepAlive: true, maxSockets: s.concurrency + 2 };
      const client: S3Api =
        this.fakeClient ??
        new sdk.S3Client({
          region: s.region,
          ...(s.endpoint ? { endpoint: s.endpoint } : {}),
          forcePathStyle: s.forcePathStyle,
          ...(s.credentials ? { credentials: s.credentials } : {}),
          maxAttempts: 1, // retries are ours (s3retry.ts)
          // Checksums only where S3 requires them: many S3-compatible stores reject the newer trailers.
          requestChecksumCalculation: 'WHEN_REQUIRED',
          responseChecksumValidation: 'WHEN_REQUIRED',
          // The per-request timeout is ours (an abort signal per attempt): the handler's own requestTimeout
          // only logs a warning. Nothing of the SDK may write to the terminal (one clear error line).
          requestHandler: {
            connectionTimeout: s.connectTimeoutMs,
            httpAgent: new http.Agent(agentOptions),
            httpsAgent: new https.Agent(agentOptions),
            socketAcquisitionWarningTimeout: 3_600_000,
            logger: SILENT,
          },
          logger: SILENT,
        });
      return { client, sdk };
    });
    return this.connection;
  }

  /** Runs one S3 operation with the store's retry discipline; failures become one clear BlocksafeError. */
  private async call<T>(op: string, key: string | undefined, attempt: (client: S3Api, sdk: Sdk, signal: AbortSignal) => Promise<T>): Promise<T> {
    if (this.closed.signal.aborted) throw new BlocksafeError(`The S3 store ${this.location} is closed.`);
    const { client, sdk } = await this.connect();
    try {
      return await withRetries(this.settings.policy, (signal) => attempt(client, sdk, signal), {
        closed: this.closed.signal,
        semaphore: this.semaphore,
        onRetry: this.settings.debug
          ? ({ attempt: n, delayMs, kind, error }) =>
              process.stderr.write(`blocksafe: debug: S3 ${op}${key ? ` ${key}` : ''} attempt ${n} failed (${kind}: ${describeCause(error)}); retrying in ${delayMs} ms\n`)
          : undefined,
      });
    } catch (err) {
      throw this.describe(err, op, key);
    }
  }

  /** One sentence about a failed request: what, where, why, and what to do. */
  describe(err: unknown, op: string, key: string | undefined): BlocksafeError {
    if (err instanceof BlocksafeError) return err;
    if (err instanceof StoreClosed) return new BlocksafeError(`The S3 store ${this.location} was closed while ${op} was running.`, undefined, { cause: err });
    let last = err;
    let kind: FailureKind = classifyFailure(err);
    let tries = '';
    if (err instanceof RetriesExhausted) {
      last = err.last;
      kind = err.kind;
      if (err.attempts > 1) tries = ` (${err.attempts} attempts in ${formatMs(err.elapsedMs)})`;
    }
    const e = last as { name?: string; Code?: string; message?: string; $response?: { headers?: Record<string, string> } };
    const name = e?.Code ?? e?.name ?? 'Error';
    const status = httpStatus(last);
    const what = `${op}${key !== undefined ? ` ${key}` : ''}`;
    const opts = { cause: last };
    if (kind === 'network' || kind === 'timeout') {
      return new BlocksafeError(
        `S3 endpoint ${this.endpointLabel} is not reachable: ${describeCause(last)}${tries}; check that it is running and reachable, then retry (backup --resume continues an interrupted backup).`,
        undefined,
        opts,
      );
    }
    if (name === 'NoSuchBucket' || (op === 'HeadBucket' && status === 404)) return this.missingBucket(opts);
    if (name === 'CredentialsProviderError' || /could not load credentials/i.test(e?.message ?? '')) {
      return new UsageError(`No S3 credentials found: set [s3] access_key_id and secret_access_key (or credentials_file), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.`, opts);
    }
    if (status === 301 || name === 'PermanentRedirect' || name === 'AuthorizationHeaderMalformed' || name === 'IllegalLocationConstraintException') {
      const actual = e?.$response?.headers?.['x-amz-bucket-region'];
      return new UsageError(`S3 bucket "${this.bucket}" is not in region ${this.settings.region}${actual ? ` but in ${actual}` : ''} (${name}); set [s3] region${actual ? ` = ${actual}` : ''}.`, opts);
    }
    if (name === 'RequestTimeTooSkewed') {
      return new BlocksafeError(
        `S3 endpoint ${this.endpointLabel} refused ${what}: the clock of this machine differs too much from the endpoint's; set the time (e.g. with NTP) and retry.`,
        undefined,
        opts,
      );
    }
    if (status === 403 || ['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'Forbidden'].includes(name)) {
      const why = name && !['Unknown', 'UnknownError', 'Error', '403'].includes(name) ? name : 'HTTP 403';
      return new BlocksafeError(
        `S3 endpoint ${this.endpointLabel} refused ${what} in bucket "${this.bucket}" (${why}); check the access key and secret ([s3] access_key_id / secret_access_key, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket's permissions.`,
        undefined,
        opts,
      );
    }
    if (kind === 'service') {
      return new BlocksafeError(
        `S3 endpoint ${this.endpointLabel} kept failing ${what} (${name}${status ? `, HTTP ${status}` : ''})${tries}; try again later (nothing was lost; backup --resume continues an interrupted backup).`,
        undefined,
        opts,
      );
    }
    return new BlocksafeError(`S3 ${what} at ${this.endpointLabel} failed: ${name}${status ? ` (HTTP ${status})` : ''}: ${(e?.message ?? String(last)).replace(/\s+/g, ' ')}`, undefined, opts);
  }

  private missingBucket(opts: { cause?: unknown }): NotFoundError {
    return new NotFoundError(
      `S3 bucket "${this.bucket}" does not exist at ${this.endpointLabel}; check --repo, or create it with "blocksafe init --create-bucket --repo ${this.location}".`,
      undefined,
      opts,
    );
  }

  /**
   * Checks that the bucket exists; a missing one is created when `create` is set, else it is an error.
   * An existing bucket is never created again (CreateBucket on an existing bucket fails on AWS in other
   * regions with IllegalLocationConstraint). Returns true when the bucket was created.
   */
  async ensureBucket(create: boolean): Promise<boolean> {
    if (await this.bucketExists()) return false;
    if (!create) throw this.missingBucket({});
    const region = this.settings.region;
    try {
      await this.call('CreateBucket', this.bucket, (client, sdk, signal) =>
        client.send(
          new sdk.CreateBucketCommand({
            Bucket: this.bucket,
            // us-east-1 is the one region that must not be named as a location constraint.
            ...(region !== 'us-east-1' ? { CreateBucketConfiguration: { LocationConstraint: region as never } } : {}),
          }),
          { abortSignal: signal },
        ),
      );
    } catch (err) {
      const cause = (err as { cause?: { name?: string } }).cause;
      if (cause?.name === 'BucketAlreadyOwnedByYou') return false; // created meanwhile by ourselves
      if (cause?.name === 'BucketAlreadyExists') throw new BlocksafeError(`S3 bucket name "${this.bucket}" is taken by another account; choose another bucket.`, undefined, { cause: err });
      throw err;
    }
    this.bucketChecked = true;
    return true;
  }

  private async bucketExists(): Promise<boolean> {
    try {
      await this.call('HeadBucket', this.bucket, (client, sdk, signal) => client.send(new sdk.HeadBucketCommand({ Bucket: this.bucket }), { abortSignal: signal }));
      this.bucketChecked = true;
      return true;
    } catch (err) {
      if (err instanceof NotFoundError) return false;
      throw err;
    }
  }

  /** HEAD answers a bare 404 for a missing bucket too: tell the two apart once. */
  private async notFoundObject(): Promise<undefined> {
    if (!this.bucketChecked && !(await this.bucketExists())) throw this.missingBucket({});
    return undefined;
  }

  async put(name: string, data: Uint8Array): Promise<void> {
    const key = this.key(name);
    const md5 = createHash('md5').update(data).digest('base64');
    await this.uploads.take(data.byteLength);
    await this.call('PutObject', key, (client, sdk, signal) =>
      client.send(new sdk.PutObjectCommand({ Bucket: this.bucket, Key: key, Body: data, ContentLength: data.byteLength, ContentMD5: md5 }), { abortSignal: signal }),
    );
  }

  /** A completed PUT is durable: nothing to do. */
  async sync(): Promise<void> {}

  async get(name: string): Promise<Buffer> {
    const data = await this.tryGet(name);
    if (data === undefined) throw new NotFoundError(`Object ${name} is missing from the repository at ${this.location}.`);
    return data;
  }

  async tryGet(name: string): Promise<Buffer | undefined> {
    const key = this.key(name);
    const data = await this.call('GetObject', key, async (client, sdk, signal) => {
      let out: { Body?: unknown; ContentLength?: number };
      try {
        out = (await client.send(new sdk.GetObjectCommand({ Bucket: this.bucket, Key: key }), { abortSignal: signal })) as typeof out;
      } catch (err) {
        if ((err as { name?: string }).name === 'NoSuchKey') return undefined;
        throw err;
      }
      return readBody(out.Body, out.ContentLength, signal);
    });
    if (data) await this.downloads.take(data.length);
    else this.bucketChecked = true; // NoSuchKey (not NoSuchBucket)
    return data;
  }

  async has(name: string): Promise<boolean> {
    return (await this.size(name)) !== undefined;
  }

  async size(name: string): Promise<number | undefined> {
    const key = this.key(name);
    const size = await this.call('HeadObject', key, async (client, sdk, signal) => {
      try {
        const out = (await client.send(new sdk.HeadObjectCommand({ Bucket: this.bucket, Key: key }), { abortSignal: signal })) as { ContentLength?: number };
        return out.ContentLength ?? 0;
      } catch (err) {
        if (httpStatus(err) === 404 && (err as { name?: string }).name !== 'NoSuchBucket') return undefined;
        throw err;
      }
    });
    return size === undefined ? this.notFoundObject() : size;
  }

  /** Deletes in batches of at most `delete_batch` (≤ 1000) keys; each batch is retried, failed keys again. */
  async delete(names: string[]): Promise<void> {
    const keys = [...new Set(names)].map((n) => this.key(n));
    const batches: string[][] = [];
    for (let i = 0; i < keys.length; i += this.settings.deleteBatch) batches.push(keys.slice(i, i + this.settings.deleteBatch));
    let next = 0;
    const worker = async () => {
      while (next < batches.length) await this.deleteBatch(batches[next++]!);
    };
    await Promise.all(Array.from({ length: Math.min(batches.length, Math.max(1, Math.min(4, this.settings.concurrency))) }, worker));
  }

  private async deleteBatch(batch: string[]): Promise<void> {
    let remaining = batch;
    await this.call('DeleteObjects', `(${batch.length} keys from ${batch[0]})`, async (client, sdk, signal) => {
      const out = (await client.send(new sdk.DeleteObjectsCommand({ Bucket: this.bucket, Delete: { Objects: remaining.map((Key) => ({ Key })), Quiet: true } }), {
        abortSignal: signal,
      })) as { Errors?: { Key?: string; Code?: string; Message?: string }[] };
      const errors = (out.Errors ?? []).filter((e) => e.Code !== 'NoSuchKey');
      if (errors.length === 0) return;
      // Retry only the keys that failed; a key-level error counts as transient unless it says otherwise.
      const failed = new Set(errors.map((e) => e.Key));
      remaining = remaining.filter((k) => failed.has(k));
      const first = errors[0]!;
      const fatal = ['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'NoSuchBucket'].includes(first.Code ?? '');
      throw Object.assign(new Error(`${errors.length} keys not deleted, e.g. ${first.Key}: ${first.Code} ${first.Message ?? ''}`.trim()), {
        name: first.Code ?? 'InternalError',
        $metadata: { httpStatusCode: fatal ? (first.Code === 'NoSuchBucket' ? 404 : 403) : 503 },
      });
    });
  }

  async *list(prefix: string, _opts?: ListOptions): AsyncIterable<ObjectInfo> {
    const full = this.keyPrefix + (prefix ? `${checkObjectName(prefix.replace(/\/$/, ''))}/` : '');
    let token: string | undefined;
    do {
      const page = (await this.call('ListObjectsV2', full || '/', (client, sdk, signal) =>
        client.send(new sdk.ListObjectsV2Command({ Bucket: this.bucket, ...(full ? { Prefix: full } : {}), MaxKeys: this.settings.listPage, ...(token ? { ContinuationToken: token } : {}) }), {
          abortSignal: signal,
        }),
      )) as { Contents?: { Key?: string; Size?: number; LastModified?: Date }[]; IsTruncated?: boolean; NextContinuationToken?: string };
      this.bucketChecked = true;
      for (const o of page.Contents ?? []) {
        if (o.Key && o.Key.startsWith(this.keyPrefix) && !o.Key.endsWith('/')) {
          yield { name: o.Key.slice(this.keyPrefix.length), size: o.Size ?? 0, mtime: o.LastModified ? new Date(o.LastModified).getTime() : 0 };
        }
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
      if (page.IsTruncated && !token) throw new BlocksafeError(`S3 endpoint ${this.endpointLabel} returned a truncated listing without a continuation token for ${this.location}.`);
    } while (token);
  }

  /** Stops waiting and running requests (they fail with "closed") and releases the connections. */
  async close(): Promise<void> {
    if (this.closed.signal.aborted) return;
    this.closed.abort();
    const c = this.connection;
    if (c) (await c.catch(() => undefined))?.client.destroy();
  }
}

/** Reads a GetObject body, aborting on `signal`; a body shorter than announced is a (retried) reset. */
async function readBody(body: unknown, expected: number | undefined, signal: AbortSignal): Promise<Buffer> {
  if (body === undefined || body === null) return Buffer.alloc(0);
  const stream = body as Readable & { transformToByteArray?: () => Promise<Uint8Array> };
  let data: Buffer;
  if (typeof (stream as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === 'function') {
    const onAbort = () => stream.destroy?.(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      const chunks: Buffer[] = [];
      for await (const chunk of stream as AsyncIterable<Uint8Array>) chunks.push(Buffer.from(chunk));
      data = Buffer.concat(chunks);
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
  } else if (stream.transformToByteArray) {
    data = Buffer.from(await stream.transformToByteArray());
  } else {
    throw new BlocksafeError('Unexpected body type from the S3 client.');
  }
  if (expected !== undefined && data.length !== expected) {
    throw Object.assign(new Error(`response body ended after ${data.length} of ${expected} bytes`), { code: 'ECONNRESET' });
  }
  return data;
}

function describeCause(err: unknown): string {
  const e = err as { message?: string; code?: string; name?: string; errors?: { message?: string }[] };
  // Node reports a refused dual-stack connect as an AggregateError without a message.
  let msg =
    e?.message ||
    e?.errors
      ?.map((x) => x.message)
      .filter(Boolean)
      .join(', ') ||
    e?.code ||
    e?.name ||
    String(err);
  msg = msg.replace(/\s+/g, ' ').trim();
  const connect = /did not establish a connection .* timeout of (\d+) ms/.exec(msg);
  if (connect) msg = `no connection within ${formatMs(Number(connect[1]))}`;
  if (e?.code && !msg.includes(e.code)) msg = `${msg} (${e.code})`;
  return msg;
}

/** Before creating a repository: makes sure an S3 bucket exists (creating it only with --create-bucket). */
export async function prepareStoreForInit(store: BlobStore, createBucket: boolean): Promise<boolean> {
  if (store instanceof S3Store) return store.ensureBucket(createBucket);
  if (createBucket) throw new UsageError('--create-bucket applies only to s3:// repositories.');
  return false;
}
