import { randomBytes } from 'node:crypto';
import { readFileSync, readlinkSync } from 'node:fs';
import { hostname } from 'node:os';
import { LockedError } from '../errors.js';
import type { Index } from '../index/index.js';
import type { LockHolder, LockRecord } from '../index/records.js';
import { now } from '../util/clock.js';
import { displayLocal, formatDuration } from '../util/time.js';
import type { StoreLeases } from './leases.js';

/**
 * Locks that name their holder, at two levels:
 *
 * - in the LMDB index, checked and taken in one transaction: every process that shares the index (all
 *   processes of a directory repository; the processes of one machine for an S3 repository) sees them;
 * - as leases in the store (`locks/<holder>`, leases.ts), so that processes on other machines sharing an
 *   S3 bucket see them too.
 *
 * Resources: `volume:NAME` (one backup per volume), `version:ID` (exclusive for its writer and for `rm`,
 * shared for readers: restore, scrub, nbd, a backup's base), `target:PATH` (one restore per target),
 * `writer` (shared by every process that writes versions: cleanup and rekey look at them), `keys` (shared
 * by every process that reads or writes objects with the keyring it loaded; exclusive to retire keys),
 * `cleanup`, `rekey`, and `sweep` (a cleanup deleting objects; leases only, see leases.ts).
 *
 * A holder is dead when it stopped refreshing its locks for `staleMs`, or at once when it ran on this
 * machine in this boot and pid namespace and its process is gone (or its pid now belongs to another
 * process). A process in another pid namespace or on another machine is never judged by its pid.
 */
export type LockMode = 'shared' | 'exclusive';

export interface LockSettings {
  /** Heartbeat interval of held locks and leases. */
  refreshMs: number;
  /** A holder whose heartbeat is older than this is dead. */
  staleMs: number;
  /** How long to wait for a conflicting holder before giving up with exit code 4 (0: do not wait). */
  waitMs: number;
}

export const DEFAULT_LOCK_SETTINGS: LockSettings = { refreshMs: 5 * 60_000, staleMs: 30 * 60_000, waitMs: 0 };

export const LockNames = {
  cleanup: 'cleanup',
  rekey: 'rekey',
  writer: 'writer',
  keys: 'keys',
  sweep: 'sweep',
  volume: (name: string) => `volume:${name}`,
  version: (id: string) => `version:${id}`,
  target: (path: string) => `target:${path}`,
};

export function processStartTime(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 22, counted after the ")" that ends the command name (which may contain spaces).
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[19]);
  } catch {
    return null;
  }
}

function readOr(read: () => string, fallback: string): string {
  try {
    return read().trim();
  } catch {
    return fallback;
  }
}

let me: LockHolder | undefined;

/**
 * This process as a lock holder. BLOCKSAFE_TEST_HOST makes a test process look like another machine (its
 * own host name and boot), so that two "hosts" can share one bucket on one test machine.
 */
export function currentHolder(): LockHolder {
  const testHost = process.env.BLOCKSAFE_TEST_HOST;
  me ??= {
    host: testHost || hostname(),
    boot_id: testHost ? `test-boot-${testHost}` : readOr(() => readFileSync('/proc/sys/kernel/random/boot_id', 'utf8'), 'unknown'),
    pid_ns: readOr(() => readlinkSync('/proc/self/ns/pid'), 'unknown'),
    pid: process.pid,
    pid_start: processStartTime(process.pid),
    command: currentCommand(),
  };
  return me;
}

/** The command line of this process, for lock holders ("blocksafe backup /dev/sdb root"). */
export function currentCommand(): string {
  return ['blocksafe', ...process.argv.slice(2).filter((a) => !a.startsWith('--passphrase'))].join(' ').slice(0, 200);
}

/** True when `h` is a process of this machine, boot and pid namespace that has exited (or whose pid was reused). */
export function holderIsGone(h: Partial<LockHolder>): boolean {
  const self = currentHolder();
  if (h.boot_id !== self.boot_id || h.pid_ns !== self.pid_ns || h.boot_id === 'unknown' || typeof h.pid !== 'number') return false;
  try {
    process.kill(h.pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ESRCH') return true;
  }
  const start = processStartTime(h.pid);
  return h.pid_start != null && start !== null && start !== h.pid_start;
}

/** Whether an LMDB lock record belongs to a dead holder. Records of older versions lack the heartbeat fields. */
export function lockIsStale(l: LockRecord, settings: LockSettings, at = now()): boolean {
  const beat = typeof l.refreshed === 'number' ? l.refreshed : Date.parse(l.started);
  if (at - beat > settings.staleMs) return true;
  if (l.boot_id === undefined) return l.host === hostname() && holderIsGone({ ...currentHolder(), pid: l.pid, pid_start: l.pid_start });
  return holderIsGone(l);
}

export function describeHolder(h: LockHolder & { started: string }): string {
  return `pid ${h.pid} on ${h.host} ("${h.command}", since ${displayLocal(new Date(h.started))})`;
}

export interface Lock {
  release(): Promise<void>;
}

interface Held {
  resource: string;
  key: string;
  mode: LockMode;
  store: boolean;
}

/**
 * The locks of one process on one repository: LMDB records plus, where the store is shared and writable,
 * the process's lease in the store. A heartbeat refreshes both; writers ask `assertHealthy()` before
 * they publish anything, so a process that lost its lease (store unreachable for too long, or the lease
 * removed) stops instead of racing a cleanup that already counts it as dead.
 */
export class LockManager {
  private readonly held: Held[] = [];
  private readonly holderKey = `${currentHolder().host}:${process.pid}:${randomBytes(4).toString('hex')}`;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    readonly index: Index,
    readonly leases: StoreLeases | null,
    readonly settings: LockSettings = DEFAULT_LOCK_SETTINGS,
  ) {}

  /**
   * Takes `resource` in `mode`, in the index and (unless `indexOnly`) in the store, waiting up to
   * `settings.waitMs` for a conflicting holder; otherwise a LockedError (exit 4) naming the holder.
   */
  async acquire(resource: string, mode: LockMode, what: string, opts: { indexOnly?: boolean; storeOnly?: boolean } = {}): Promise<Lock> {
    const deadline = Date.now() + this.settings.waitMs;
    for (let delay = 200; ; delay = Math.min(delay * 2, 10_000)) {
      try {
        return await this.tryAcquire(resource, mode, what, opts);
      } catch (err) {
        if (!(err instanceof LockedError) || Date.now() + delay > deadline) throw err;
      }
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  private async tryAcquire(resource: string, mode: LockMode, what: string, opts: { indexOnly?: boolean; storeOnly?: boolean }): Promise<Lock> {
    const key = `${this.holderKey}:${randomBytes(2).toString('hex')}`;
    const holder = currentHolder();
    const started = new Date().toISOString();
    if (!opts.storeOnly) {
      const record: LockRecord = { ...holder, resource, mode, started, refreshed: now() };
      const conflict = await this.index.acquireLock(resource, key, record, (l) => lockIsStale(l, this.settings));
      if (conflict) throw lockedError(what, conflict, this.settings);
    }
    const store = !!this.leases && !opts.indexOnly;
    if (store) {
      try {
        await this.leases!.add(resource, mode, what);
      } catch (err) {
        if (!opts.storeOnly) await this.index.releaseLock(resource, key);
        throw err;
      }
    }
    const entry: Held = { resource, key, mode, store };
    this.held.push(entry);
    this.startHeartbeat();
    let released = false;
    return {
      release: async () => {
        if (released) return;
        released = true;
        const i = this.held.indexOf(entry);
        if (i >= 0) this.held.splice(i, 1);
        if (!opts.storeOnly) await this.index.releaseLock(resource, key);
        if (store) await this.leases!.remove(resource, mode);
        if (this.held.length === 0) this.stopHeartbeat();
      },
    };
  }

  /** Throws when this process can no longer be sure its store lease is seen by others (see leases.ts). */
  assertHealthy(): void {
    this.leases?.assertHealthy();
  }

  /** Live LMDB lock records on resources matching `pred`, other processes' and ours. */
  liveLocks(pred: (resource: string) => boolean): LockRecord[] {
    const out: LockRecord[] = [];
    for (const l of this.index.allLocks()) if (pred(l.resource) && !lockIsStale(l, this.settings)) out.push(l);
    return out;
  }

  private startHeartbeat(): void {
    if (this.timer) return;
    this.timer = setInterval(() => void this.beat(), this.settings.refreshMs);
    this.timer.unref();
  }

  private stopHeartbeat(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  private async beat(): Promise<void> {
    await this.index
      .refreshLocks(
        this.held.filter((h) => h.resource !== LockNames.sweep),
        now(),
      )
      .catch(() => undefined);
    await this.leases?.refresh();
  }

  /** Releases everything this process still holds (on close). */
  async releaseAll(): Promise<void> {
    this.stopHeartbeat();
    for (const h of this.held.splice(0)) await this.index.releaseLock(h.resource, h.key).catch(() => undefined);
    await this.leases?.releaseAll();
  }
}

function lockedError(what: string, holder: LockRecord, settings: LockSettings): LockedError {
  const silent = now() - (holder.refreshed ?? Date.parse(holder.started));
  const quiet = silent > settings.refreshMs * 1.5 ? ` (no heartbeat for ${formatDuration(silent)}; counted as dead after ${formatDuration(settings.staleMs)})` : '';
  return new LockedError(`${what} is locked by ${describeHolder(holder)}${quiet}; wait for it to finish, or stop that process.`);
}

/** Runs `fn` holding the lock; releases it whatever happens. */
export async function withLock<T>(locks: LockManager, resource: string, mode: LockMode, what: string, fn: () => Promise<T>): Promise<T> {
  const lock = await locks.acquire(resource, mode, what);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}

/** True while a live cleanup holds its lock in this index. */
export function cleanupRunning(locks: LockManager): boolean {
  return locks.liveLocks((r) => r === LockNames.cleanup).length > 0;
}
