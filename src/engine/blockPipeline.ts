import { BlocksafeError, IntegrityError } from '../errors.js';
import type { BlockRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import { DirectoryStore } from '../store/directory.js';
import { BufferPool, ownArrayBuffer } from '../util/buffers.js';
import { gcEvery } from '../util/gc.js';
import type { Throttle } from '../util/throttle.js';
import { Arena } from './arena.js';
import { cleanupRunning, LockNames, type Lock } from './locks.js';
import type { Repository } from './repository.js';
import { defaultThreads, WorkerPool } from './workerPool.js';

/** Optional bandwidth limits on the store side of the pipeline. */
export interface PipelineLimits {
  storeRead?: Throttle;
  storeWrite?: Throttle;
}

/**
 * The one block pipeline: backup, restore, scrub and copy all move blocks through it. CPU work
 * (checksum, zstd, AEAD) happens in the worker pool; the store and index are touched here.
 */
export class BlockPipeline {
  /** Blocks written by this pipeline and not yet committed to the index, so concurrent duplicates are written once. */
  private readonly inFlight = new Map<string, Promise<BlockRecord>>();

  /** Block-sized buffers shared with the source reader, reused instead of left to the garbage collector. */
  readonly buffers: BufferPool;

  /** A keyring reload in progress, and how many reloads brought new keys (see load). */
  private keyReload: Promise<boolean> | undefined;
  private keysUpdated = 0;

  /** Objects may be written to the store straight out of shared memory (else they are copied first). */
  private readonly putShared: boolean;

  private constructor(
    readonly repo: Repository,
    private readonly pool: WorkerPool,
    private readonly limits: PipelineLimits,
    private readonly keysLock: Lock,
    /** Block memory shared with the workers: the slot-based methods (backup, restore) move blocks through it. */
    readonly arena: Arena,
  ) {
    this.buffers = new BufferPool(repo.blockSize, pool.size * 4 + 16);
    // The S3 client may hold on to or re-read a body in ways we do not control: it gets its own copy.
    this.putShared = repo.store instanceof DirectoryStore;
  }

  /**
   * Starts the workers with the repository's keys. The pipeline holds the `keys` lock (shared) for its
   * life: a rekey does not retire a key while a process that may still use it runs. `depth` is the most
   * blocks a caller has in flight at once: each holds one arena slot (pages of unused slots are never touched;
   * slots are reused most recently freed first). Fewer slots than blocks in flight only make callers wait.
   */
  static async start(repo: Repository, threads?: number, limits: PipelineLimits = {}, depth?: number): Promise<BlockPipeline> {
    const lock = await repo.locks.acquire(LockNames.keys, 'shared', 'The repository keys (a rekey is retiring old keys)');
    try {
      const n = threads ?? defaultThreads();
      const slotSize = Arena.slotSizeFor(repo.blockSize);
      // A block in flight holds one slot; shared WebAssembly memory ends at 4 GiB (64 MiB blocks, deep queues).
      const arena = new Arena(slotSize, Math.max(1, Math.min(Math.max(depth ?? n + 2, n + 2) + 2, Math.floor(2 ** 32 / slotSize) - 1)));
      return new BlockPipeline(repo, new WorkerPool({ ...repo.workerInit(), arena: arena.memory, arenaSlotSize: arena.slotSize }, n), limits, lock, arena);
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  /** Checksum of the block of `length` bytes in arena slot `slot` (at BLOCK_AT), or null when it is all zeros. */
  async digestSlot(slot: number, length: number): Promise<Buffer | null> {
    const reply = await this.pool.request({ op: 'digestSlot', slot, length }, []);
    if (reply.op !== 'digestSlot') throw pipelineError(reply);
    return reply.checksum ? Buffer.from(reply.checksum.buffer, reply.checksum.byteOffset, reply.checksum.byteLength) : null;
  }

  /**
   * store() for a block in an arena slot (at BLOCK_AT): makes sure it is in the store and returns its record and
   * whether this call wrote it. The slot stays the caller's, but its block is gone when this wrote it (sealed
   * in place).
   */
  storeSlot(slot: number, length: number, checksum: Buffer): Promise<{ record: BlockRecord; written: boolean }> {
    return this.ensureStored(checksum, (hex) => this.writeSlot(slot, length, checksum, hex));
  }

  /**
   * The one deduplication path of store() and storeSlot(): a valid record in the index, or a write of the
   * same checksum already in flight, is used instead of writing; otherwise `write` runs and is shared with
   * concurrent callers. `skip` runs when nothing is written (the caller's buffer is not needed).
   */
  private async ensureStored(checksum: Buffer, write: (hex: string) => Promise<BlockRecord>, skip?: () => void): Promise<{ record: BlockRecord; written: boolean }> {
    await this.retain(checksum);
    const known = this.repo.index.getBlock(checksum);
    if (known && known.valid) {
      skip?.();
      return { record: known, written: false };
    }
    const hex = checksum.toString('hex');
    const pending = this.inFlight.get(hex);
    if (pending) {
      skip?.();
      return { record: await pending, written: false };
    }
    const job = write(hex);
    this.inFlight.set(hex, job);
    try {
      return { record: await job, written: true };
    } catch (err) {
      this.inFlight.delete(hex);
      throw err;
    }
  }

  private async writeSlot(slot: number, size: number, checksum: Buffer, hex: string): Promise<BlockRecord> {
    // Sealed in place: the object replaces the block in its slot.
    const reply = await this.pool.request({ op: 'sealSlot', slot, length: size, context: checksum }, []);
    if (reply.op !== 'sealSlot') throw pipelineError(reply);
    await this.limits.storeWrite?.take(reply.length);
    const object = this.arena.view(slot).subarray(reply.start, reply.start + reply.length);
    await this.repo.store.put(ObjectNames.block(hex), this.putShared ? object : Buffer.from(object));
    return { size, stored: reply.length, key_id: reply.keyId, valid: true, verified: Date.now() };
  }

  /**
   * load() into an arena slot: the block with this checksum is read into `slot`, authenticated, opened and
   * verified there; returns where in the slot its `size` bytes start. Throws IntegrityError naming what is
   * wrong (then the slot holds garbage).
   */
  async loadInto(checksum: Buffer, size: number, slot: number): Promise<number> {
    const hex = checksum.toString('hex');
    const keysSeen = this.keysUpdated;
    const rawLength = await this.readObject(hex, size, slot);
    let reply = await this.pool.request({ op: 'openSlot', raw: slot, rawLength, size, context: checksum, checksum }, []);
    if (reply.op === 'error' && /unknown key id/.test(reply.message) && (this.keysUpdated !== keysSeen || (await this.reloadKeys()))) {
      // Refused before anything was decrypted in place: the slot still holds the object.
      reply = await this.pool.request({ op: 'openSlot', raw: slot, rawLength, size, context: checksum, checksum }, []);
    }
    if (reply.op === 'error') throw new IntegrityError(`block ${hex.slice(0, 16)}… is damaged: ${reply.message}`);
    if (reply.op !== 'openSlot') throw pipelineError(reply);
    return reply.at;
  }

  /** Reads block object `hex` into arena slot `slot`; returns its length. */
  private async readObject(hex: string, size: number, slot: number): Promise<number> {
    const name = ObjectNames.block(hex);
    await this.limits.storeRead?.take(size);
    const into = this.arena.view(slot);
    const tooLarge = () => new IntegrityError(`block ${hex.slice(0, 16)}… is damaged: its object is larger than any block object can be`);
    if (this.repo.store.readInto) {
      const n = await this.repo.store.readInto(name, into);
      if (n === undefined) throw new IntegrityError(`block ${hex.slice(0, 16)}… is missing from the store`);
      if (n > into.length) throw tooLarge();
      return n;
    }
    const raw = await this.repo.store.tryGet(name);
    if (!raw) throw new IntegrityError(`block ${hex.slice(0, 16)}… is missing from the store`);
    if (raw.length > into.length) throw tooLarge();
    into.set(raw);
    return raw.length;
  }

  get threads(): number {
    return this.pool.size;
  }

  /** Checksum of a block, or null when it is all zeros. The buffer is handed to a worker and returned. */
  async digest(data: Buffer): Promise<{ data: Buffer; checksum: Buffer | null }> {
    const ab = ownArrayBuffer(data);
    const reply = await this.pool.request({ op: 'digest', data: ab }, [ab]);
    if (reply.op !== 'digest') throw pipelineError(reply);
    return { data: Buffer.from(reply.data), checksum: reply.checksum ? Buffer.from(reply.checksum) : null };
  }

  /**
   * Makes sure the block with this checksum is in the store. Returns the block record and whether this call
   * wrote it (false: deduplicated against the index or a concurrent write). The buffer is consumed.
   */
  store(data: Buffer, checksum: Buffer): Promise<{ record: BlockRecord; written: boolean }> {
    return this.ensureStored(
      checksum,
      (hex) => this.write(data, checksum, hex),
      () => this.buffers.give(data),
    );
  }

  /** Writes the block again under the current data key (rekey), whatever the index says. */
  rewrite(data: Buffer, checksum: Buffer): Promise<BlockRecord> {
    return this.write(data, checksum, checksum.toString('hex'));
  }

  private async write(data: Buffer, checksum: Buffer, hex: string): Promise<BlockRecord> {
    const size = data.length;
    const ab = ownArrayBuffer(data);
    const context = ownArrayBuffer(Buffer.from(checksum));
    const reply = await this.pool.request({ op: 'seal', data: ab, context }, [ab, context]);
    if (reply.op !== 'seal') throw pipelineError(reply);
    this.buffers.give(new Uint8Array(reply.data));
    await this.limits.storeWrite?.take(reply.object.byteLength);
    await this.repo.store.put(ObjectNames.block(hex), new Uint8Array(reply.object));
    return { size, stored: reply.object.byteLength, key_id: reply.keyId, valid: true, verified: Date.now() };
  }

  /**
   * Called before relying on a block by reference or dedup: if a cleanup marked it as garbage, take it off
   * the list (or wait while a cleanup is deleting it, after which it is simply written anew).
   */
  async retain(checksum: Buffer): Promise<void> {
    while (this.repo.index.getGcCandidate(checksum)) {
      if (this.repo.index.rescueGcCandidate(checksum) === 'ok') return;
      if (!cleanupRunning(this.repo.locks)) {
        // Doomed by a cleanup that died: its record is gone already, so the block is simply written anew.
        await this.repo.index.removeGcCandidates([checksum]);
        return;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** Forget in-flight entries once the index holds their records. */
  committed(checksums: Iterable<Buffer>): void {
    for (const c of checksums) this.inFlight.delete(c.toString('hex'));
  }

  /**
   * Reads, authenticates, decompresses and verifies one block. Throws IntegrityError naming what is wrong.
   * A block under a key id the workers do not know may have been re-encrypted by a rekey since this process
   * loaded the keyring: the keyring is read again once before the block counts as damaged.
   */
  async load(checksum: Buffer, size: number): Promise<Buffer> {
    const hex = checksum.toString('hex');
    const keysSeen = this.keysUpdated;
    let reply = await this.open(checksum, size);
    if (reply.op === 'error' && /unknown key id/.test(reply.message) && (this.keysUpdated !== keysSeen || (await this.reloadKeys()))) reply = await this.open(checksum, size);
    if (reply.op === 'error') throw new IntegrityError(`block ${hex.slice(0, 16)}… is damaged: ${reply.message}`);
    if (reply.op !== 'open') throw pipelineError(reply);
    return Buffer.from(reply.plain);
  }

  private async open(checksum: Buffer, size: number) {
    const hex = checksum.toString('hex');
    await this.limits.storeRead?.take(size);
    const raw = await this.repo.store.tryGet(ObjectNames.block(hex));
    if (!raw) throw new IntegrityError(`block ${hex.slice(0, 16)}… is missing from the store`);
    const object = ownArrayBuffer(raw);
    const context = ownArrayBuffer(Buffer.from(checksum));
    const expected = ownArrayBuffer(Buffer.from(checksum));
    return this.pool.request({ op: 'open', object, context, checksum: expected, size }, [object, context, expected]);
  }

  /** Reads the keyring again and hands new keys to the workers; true when there were new keys. */
  private reloadKeys(): Promise<boolean> {
    this.keyReload ??= (async () => {
      try {
        if (!(await this.repo.reloadKeyring())) return false;
        const keys = this.repo.codecKeys;
        await this.pool.updateKeys({ dataKeys: [...keys.dataKeys], currentKeyId: keys.currentKeyId });
        this.keysUpdated++;
        return true;
      } finally {
        this.keyReload = undefined;
      }
    })();
    return this.keyReload;
  }

  async close(): Promise<void> {
    await this.pool.close();
    await this.keysLock.release();
  }
}

function pipelineError(reply: { op: string; message?: string }): BlocksafeError {
  return new BlocksafeError(`Internal error in the block pipeline: ${reply.message ?? `unexpected reply ${reply.op}`}`);
}

/**
 * Runs `start(i)` for i in [0, count) with at most `depth` in flight and hands results to `finish` in
 * order. Memory is bounded by depth, whatever count is.
 */
export async function orderedWindow<T>(
  count: number,
  depth: number,
  start: (i: number) => Promise<T>,
  finish: (i: number, result: T) => Promise<void> | void,
  first = 0,
  /** Explicit garbage collection every this many blocks (0: none), for callers that allocate per block. */
  collectEvery = 16,
): Promise<void> {
  const window: Promise<T>[] = [];
  const tick = collectEvery > 0 ? gcEvery(collectEvery) : () => undefined;
  let next = first;
  const fill = () => {
    while (next < count && window.length < depth) {
      const p = start(next++);
      p.catch(() => undefined); // observed below, in order; avoid unhandled-rejection noise meanwhile
      window.push(p);
    }
  };
  fill();
  for (let i = first; i < count; i++) {
    const result = await window.shift()!;
    await finish(i, result);
    tick();
    fill();
  }
}
