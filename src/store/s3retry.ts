/**
 * The request discipline of the S3 store, kept free of the AWS SDK so that it can be tested with fakes:
 * a semaphore bounding requests in flight, a per-attempt timeout, and retries of transient failures
 * (5xx, throttling, connection resets and refusals, timeouts) with exponential backoff and jitter.
 */

export interface RetryPolicy {
  /** Retries after the first attempt (0 = try once). */
  retries: number;
  /** Backoff before retry n (0-based) is drawn from [d/2, d] with d = min(maxDelayMs, baseDelayMs · 2^n). */
  baseDelayMs: number;
  maxDelayMs: number;
  /** Each attempt is aborted after this long (0 = no limit). */
  timeoutMs: number;
}

/** Why an attempt failed, as far as retrying is concerned. */
export type FailureKind =
  /** The endpoint could not be reached or dropped the connection (refused, reset, DNS, …). */
  | 'network'
  /** No answer within the per-request timeout. */
  | 'timeout'
  /** The service answered that it is overloaded or failed internally (5xx, 429, SlowDown, …). */
  | 'service'
  /** Anything else (403, 404, bad request, …): retrying would not help. */
  | 'fatal';

const NETWORK_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'EHOSTDOWN',
  'ENETUNREACH',
  'ENETDOWN',
  'ENETRESET',
  'EPROTO',
  'ERR_STREAM_PREMATURE_CLOSE',
  'UND_ERR_SOCKET',
  'UND_ERR_CONNECT_TIMEOUT',
]);

const THROTTLING_NAMES = new Set([
  'SlowDown',
  'Throttling',
  'ThrottlingException',
  'ThrottledException',
  'RequestThrottled',
  'RequestThrottledException',
  'TooManyRequestsException',
  'RequestLimitExceeded',
  'BandwidthLimitExceeded',
  'ProvisionedThroughputExceededException',
  'ServiceUnavailable',
  'InternalError',
  'RequestTimeout',
  'RequestTimeoutException',
  'PriorRequestNotComplete',
]);

interface ErrorLike {
  name?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  $retryable?: unknown;
  cause?: unknown;
}

/** The HTTP status of an SDK error, if the service answered at all. */
export function httpStatus(err: unknown): number | undefined {
  return (err as ErrorLike | undefined)?.$metadata?.httpStatusCode;
}

/** The system error code (ECONNREFUSED, …) of an error or of its causes. */
export function networkCode(err: unknown): string | undefined {
  let e = err as ErrorLike | undefined;
  for (let depth = 0; e && depth < 5; depth++) {
    if (typeof e.code === 'string' && NETWORK_CODES.has(e.code)) return e.code;
    e = e.cause as ErrorLike | undefined;
  }
  const msg = (err as ErrorLike | undefined)?.message ?? '';
  if (/socket hang up/i.test(msg)) return 'ECONNRESET';
  return undefined;
}

export function classifyFailure(err: unknown): FailureKind {
  if (err instanceof AttemptTimeout) return 'timeout';
  const e = err as ErrorLike | undefined;
  const status = httpStatus(err);
  if (e?.name && THROTTLING_NAMES.has(e.name)) return 'service';
  if (status !== undefined && (status >= 500 || status === 429)) return 'service';
  if (networkCode(err)) return 'network';
  if (e?.name === 'TimeoutError' || e?.code === 'TimeoutError') return 'timeout';
  if (status === undefined && e?.$retryable) return 'network';
  return 'fatal';
}

/** The backoff before retry number `retry` (0-based): exponential, capped, with "equal jitter". */
export function backoffDelay(retry: number, policy: Pick<RetryPolicy, 'baseDelayMs' | 'maxDelayMs'>, random: () => number = Math.random): number {
  const ceiling = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** Math.min(retry, 30));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** Thrown into an attempt whose per-request timeout fired. */
export class AttemptTimeout extends Error {
  constructor(readonly timeoutMs: number) {
    super(`no answer within ${formatMs(timeoutMs)}`);
    this.name = 'AttemptTimeout';
  }
}

/** The store was closed while the request waited or ran. */
export class StoreClosed extends Error {
  constructor() {
    super('the S3 store was closed');
    this.name = 'StoreClosed';
  }
}

/** The last failure of a request that was given up, with how hard it was tried. */
export class RetriesExhausted extends Error {
  constructor(
    readonly last: unknown,
    readonly kind: FailureKind,
    readonly attempts: number,
    readonly elapsedMs: number,
  ) {
    super((last as Error)?.message ?? String(last));
    this.name = 'RetriesExhausted';
  }
}

export function formatMs(ms: number): string {
  return ms < 1000 ? `${ms} ms` : `${+(ms / 1000).toFixed(1)} s`;
}

/** Counting semaphore: at most `limit` holders at once, served in order. */
export class Semaphore {
  private active = 0;
  private readonly waiters: (() => void)[] = [];

  constructor(readonly limit: number) {
    if (!(limit >= 1)) throw new RangeError('semaphore limit must be at least 1');
  }

  get inUse(): number {
    return this.active;
  }

  acquire(): Promise<void> {
    if (this.active < this.limit) {
      this.active++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(): void {
    const next = this.waiters.shift();
    if (next)
      next(); // the slot passes straight to the next waiter
    else this.active--;
  }
}

/** Sleeps `ms`, or rejects with StoreClosed as soon as `closed` aborts. */
export function sleep(ms: number, closed?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (closed?.aborted) return reject(new StoreClosed());
    const onAbort = () => {
      clearTimeout(timer);
      reject(new StoreClosed());
    };
    const timer = setTimeout(() => {
      closed?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    closed?.addEventListener('abort', onAbort, { once: true });
  });
}

export interface RetryHooks {
  /** Aborted when the store closes: waiting and running attempts stop with StoreClosed. */
  closed?: AbortSignal;
  /** Bounds attempts in flight (held during an attempt, not during the backoff). */
  semaphore?: Semaphore;
  /** Called before each retry (for debug logging and tests). */
  onRetry?: (info: { attempt: number; delayMs: number; kind: FailureKind; error: unknown }) => void;
  random?: () => number;
}

/**
 * Runs `attempt` until it succeeds, a failure is not transient, or the retries are used up (then throws
 * RetriesExhausted carrying the last error). Each attempt gets a signal that aborts on its timeout or when
 * the store closes; an attempt that ignores the signal is still abandoned when the timeout fires.
 */
export async function withRetries<T>(policy: RetryPolicy, attempt: (signal: AbortSignal) => Promise<T>, hooks: RetryHooks = {}): Promise<T> {
  const started = Date.now();
  for (let n = 0; ; n++) {
    if (hooks.closed?.aborted) throw new StoreClosed();
    await hooks.semaphore?.acquire();
    let result: { ok: true; value: T } | { ok: false; error: unknown };
    try {
      result = await runAttempt(policy.timeoutMs, attempt, hooks.closed);
    } finally {
      hooks.semaphore?.release();
    }
    if (result.ok) return result.value;
    const error = result.error;
    if (error instanceof StoreClosed || hooks.closed?.aborted) throw new StoreClosed();
    const kind = classifyFailure(error);
    if (kind === 'fatal' || n >= policy.retries) throw new RetriesExhausted(error, kind, n + 1, Date.now() - started);
    const delayMs = backoffDelay(n, policy, hooks.random);
    hooks.onRetry?.({ attempt: n + 1, delayMs, kind, error });
    await sleep(delayMs, hooks.closed);
  }
}

async function runAttempt<T>(timeoutMs: number, attempt: (signal: AbortSignal) => Promise<T>, closed?: AbortSignal): Promise<{ ok: true; value: T } | { ok: false; error: unknown }> {
  const ac = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  let onClosed: (() => void) | undefined;
  const stop = new Promise<never>((_, reject) => {
    if (timeoutMs > 0) {
      timer = setTimeout(() => {
        const e = new AttemptTimeout(timeoutMs);
        ac.abort(e);
        reject(e);
      }, timeoutMs);
    }
    onClosed = () => {
      const e = new StoreClosed();
      ac.abort(e);
      reject(e);
    };
    if (closed?.aborted) onClosed();
    else closed?.addEventListener('abort', onClosed, { once: true });
  });
  stop.catch(() => undefined);
  try {
    const value = await Promise.race([attempt(ac.signal), stop]);
    return { ok: true, value };
  } catch (error) {
    // An SDK call aborted by our timer reports an AbortError: name the real reason.
    if (ac.signal.aborted && ac.signal.reason instanceof Error) return { ok: false, error: ac.signal.reason };
    return { ok: false, error };
  } finally {
    if (timer) clearTimeout(timer);
    if (onClosed) closed?.removeEventListener('abort', onClosed);
  }
}
