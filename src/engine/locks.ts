import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { LockedError } from '../errors.js';
import type { Index } from '../index/index.js';
import type { LockRecord } from '../index/records.js';
import { displayLocal } from '../util/time.js';

/**
 * Locks that name their holder. They live in the LMDB index (one transaction checks and takes them, across
 * processes). Only what must be exclusive is locked: a volume name while it is backed up, a restore target,
 * a version while it is removed (readers hold it shared). A holder on this host whose process is gone (or
 * whose pid now belongs to another process) is stale and its lock is taken over.
 */
export type LockMode = 'shared' | 'exclusive';

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

export function isStale(l: LockRecord): boolean {
  if (l.host !== hostname()) return false; // cannot tell for another machine: assume alive
  try {
    process.kill(l.pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ESRCH') return true;
  }
  const start = processStartTime(l.pid);
  return l.pid_start !== null && start !== null && start !== l.pid_start;
}

export function describeHolder(l: LockRecord): string {
  return `pid ${l.pid} on ${l.host} ("${l.command}", since ${displayLocal(new Date(l.started))})`;
}

export interface Lock {
  release(): Promise<void>;
}

/** The command line of this process, for lock holders ("blocksafe backup /dev/sdb root"). */
export function currentCommand(): string {
  return ['blocksafe', ...process.argv.slice(2).filter((a) => !a.startsWith('--passphrase'))].join(' ').slice(0, 200);
}

export async function acquireLock(index: Index, resource: string, mode: LockMode, what: string): Promise<Lock> {
  const key = `${hostname()}:${process.pid}:${randomBytes(4).toString('hex')}`;
  const record: LockRecord = {
    resource,
    mode,
    host: hostname(),
    pid: process.pid,
    pid_start: processStartTime(process.pid),
    command: currentCommand(),
    started: new Date().toISOString(),
  };
  const conflict = await index.acquireLock(resource, key, record, isStale);
  if (conflict) throw new LockedError(`${what} is locked by ${describeHolder(conflict)}; wait for it to finish, or stop that process.`);
  let released = false;
  return {
    release: async () => {
      if (released) return;
      released = true;
      await index.releaseLock(resource, key);
    },
  };
}

/** Runs `fn` holding the lock; releases it whatever happens. */
export async function withLock<T>(index: Index, resource: string, mode: LockMode, what: string, fn: () => Promise<T>): Promise<T> {
  const lock = await acquireLock(index, resource, mode, what);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}

/** True while a live cleanup holds its lock. */
export function cleanupRunning(index: Index): boolean {
  for (const l of index.allLocks()) if (l.resource === LockNames.cleanup && !isStale(l)) return true;
  return false;
}

export const LockNames = {
  cleanup: 'cleanup',
  volume: (name: string) => `volume:${name}`,
  version: (id: string) => `version:${id}`,
  target: (path: string) => `target:${path}`,
};
