import { randomBytes } from 'node:crypto';
import { IntegrityError, LockedError } from '../errors.js';
import type { LockHolder } from '../index/records.js';
import { ObjectNames, type BlobStore, type ObjectInfo } from '../store/blobstore.js';
import { now } from '../util/clock.js';
import { displayLocal, formatDuration } from '../util/time.js';
import { currentHolder, holderIsGone, LockNames, type LockMode, type LockSettings } from './locks.js';

/**
 * Leases in the store: how processes on different machines sharing one repository (an S3 bucket) see each
 * other, modelled on restic's `locks/`. Each process writes one object `locks/<random id>` listing the
 * resources it holds, rewrites it on every change and every heartbeat, and deletes it at the end.
 *
 * - Acquire = write the lease with the new resource, then list all leases: a conflicting live lease of
 *   another process means we remove ours again and fail (exit 4). Two acquirers racing both see each
 *   other and both back off; neither can miss the other, since each lists after its own write.
 * - Age is judged by the store's clock: a lease whose last write (S3 LastModified, file mtime) is older
 *   than `staleMs`, measured against the time our own lease was written in the same listing, is dead. No
 *   machine's clock is compared with another's. On this machine, boot and pid namespace a lease whose
 *   process is gone is dead at once.
 * - A holder that could not refresh its lease for `staleMs − 1.5 × refreshMs` (restic: 22.5 of 30 min), or
 *   whose lease vanished, must stop before publishing anything: others may already count it as dead.
 * - `sweep` (a cleanup deleting objects) conflicts with `writer` leases of processes using another index:
 *   writers sharing the cleanup's index see its candidates in LMDB and protect what they use; writers on
 *   other machines cannot, so sweeping and their writing exclude each other (docs/FORMAT.md, cleanup).
 * - Leases are sealed like every metadata object; one that does not open (another repository's key, a
 *   forged or zero-length object) is ignored: it can neither block nor unblock anything.
 */
export interface LeaseBody {
  lease_format: 1;
  holder: LockHolder;
  index_id: string;
  started: string;
  resources: { resource: string; mode: LockMode }[];
}

export interface LiveLease {
  name: string;
  body: LeaseBody;
  /** Store time of its last write. */
  mtime: number;
}

export interface LeaseCodec {
  encode(name: string, plain: Buffer): Buffer;
  decode(name: string, raw: Buffer): Buffer;
}

export class StoreLeases {
  private readonly name = ObjectNames.lease(randomBytes(16).toString('hex'));
  private readonly resources: { resource: string; mode: LockMode }[] = [];
  private readonly started = new Date().toISOString();
  private written = false;
  private lastWrite = 0;
  private lost: string | null = null;
  private queue: Promise<unknown> = Promise.resolve();
  /** Store time at the last listing: our own lease's LastModified plus the time since we wrote it. */
  private storeNow = now();

  constructor(
    private readonly store: BlobStore,
    private readonly codec: LeaseCodec,
    private readonly indexId: string,
    private readonly settings: LockSettings,
  ) {}

  /** Serialises changes of this process's lease (acquire, release and heartbeat may overlap). */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private body(): LeaseBody {
    return { lease_format: 1, holder: currentHolder(), index_id: this.indexId, started: this.started, resources: [...this.resources] };
  }

  private async write(): Promise<void> {
    if (this.resources.length === 0) {
      if (this.written) await this.store.delete([this.name]);
      this.written = false;
      return;
    }
    await this.store.put(this.name, this.codec.encode(this.name, Buffer.from(JSON.stringify(this.body()))));
    this.written = true;
    this.lastWrite = Date.now();
  }

  add(resource: string, mode: LockMode, what: string): Promise<void> {
    return this.serial(async () => {
      this.resources.push({ resource, mode });
      try {
        await this.write();
        const conflict = (await this.live()).find((l) => l.name !== this.name && conflicts(resource, mode, this.indexId, l.body));
        if (!conflict) return;
        throw new LockedError(
          `${what} is locked by ${describeLease(conflict.body)} (a lease in the store, seen ${formatDuration(Math.max(0, this.storeNow - conflict.mtime))} ago); wait for it to finish, or stop that process.`,
        );
      } catch (err) {
        this.dropOne(resource, mode);
        await this.write().catch(() => undefined);
        throw err;
      }
    });
  }

  remove(resource: string, mode: LockMode): Promise<void> {
    return this.serial(async () => {
      this.dropOne(resource, mode);
      await this.write();
    });
  }

  private dropOne(resource: string, mode: LockMode): void {
    const i = this.resources.findIndex((r) => r.resource === resource && r.mode === mode);
    if (i >= 0) this.resources.splice(i, 1);
  }

  async releaseAll(): Promise<void> {
    await this.serial(async () => {
      this.resources.splice(0);
      await this.write().catch(() => undefined);
    });
  }

  /** Every lease of a live holder (ours included), read and opened. */
  async live(): Promise<LiveLease[]> {
    const entries: ObjectInfo[] = [];
    for await (const e of this.store.list(ObjectNames.leasePrefix)) entries.push(e);
    const own = entries.find((e) => e.name === this.name);
    // now() - lastWrite: the time since our write, plus the test clock's offset (util/clock.ts).
    this.storeNow = own ? own.mtime + (now() - this.lastWrite) : now();
    const out: LiveLease[] = [];
    const dead: string[] = [];
    for (const e of entries) {
      if (e.size === 0) continue; // an upload that did not complete
      if (e.name !== this.name && this.storeNow - e.mtime > this.settings.staleMs) continue;
      const body = await this.read(e.name);
      if (!body) continue;
      if (e.name !== this.name && holderIsGone(body.holder)) {
        dead.push(e.name);
        continue;
      }
      out.push({ name: e.name, body, mtime: e.mtime });
    }
    // A process of this machine that died (kill -9, power loss of a container) left its lease behind: we
    // can prove it is gone, other machines cannot until it is stale_after old, so remove it for them.
    if (dead.length > 0) await this.store.delete(dead).catch(() => undefined);
    return out;
  }

  private async read(name: string): Promise<LeaseBody | null> {
    try {
      const raw = await this.store.tryGet(name);
      if (!raw) return null; // released meanwhile
      const body = JSON.parse(this.codec.decode(name, raw).toString('utf8')) as LeaseBody;
      return body.lease_format === 1 && Array.isArray(body.resources) && body.holder ? body : null;
    } catch (err) {
      if (err instanceof IntegrityError || err instanceof SyntaxError) return null;
      throw err;
    }
  }

  /** Live leases of other processes. */
  async others(): Promise<LiveLease[]> {
    return (await this.live()).filter((l) => l.name !== this.name);
  }

  /** Heartbeat: rewrites the lease, unless it vanished (someone removed it: we must stop). */
  refresh(): Promise<void> {
    return this.serial(async () => {
      if (!this.written || this.lost) return;
      try {
        if ((await this.store.size(this.name)) === undefined) {
          this.lost = 'its lease in the store was removed by another process';
          return;
        }
        await this.write();
      } catch {
        // unreachable store: assertHealthy() decides when that becomes fatal
      }
    });
  }

  assertHealthy(): void {
    if (!this.written) return;
    if (this.lost) throw new LockedError(`This process can no longer prove it holds its locks (${this.lost}); it stopped without publishing anything. Run it again.`);
    const silent = Date.now() - this.lastWrite;
    if (silent > this.settings.staleMs - 1.5 * this.settings.refreshMs) {
      throw new LockedError(
        `This process could not refresh its lease in the store for ${formatDuration(silent)} (others count it as dead after ${formatDuration(this.settings.staleMs)}); it stopped without publishing anything. Check the store and run it again.`,
      );
    }
  }
}

/** Whether holding (resource, mode) with index `indexId` conflicts with lease `other`. */
function conflicts(resource: string, mode: LockMode, indexId: string, other: LeaseBody): boolean {
  for (const r of other.resources) {
    if (r.resource === resource && (mode === 'exclusive' || r.mode === 'exclusive')) return true;
    if (other.index_id !== indexId) {
      if (resource === LockNames.sweep && r.resource === LockNames.writer) return true;
      if (resource === LockNames.writer && r.resource === LockNames.sweep) return true;
    }
  }
  return false;
}

export function describeLease(b: LeaseBody): string {
  return `pid ${b.holder.pid} on ${b.holder.host} ("${b.holder.command}", since ${displayLocal(new Date(b.started))})`;
}
