import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { BlocksafeError } from '../errors.js';
import type { WorkerInit, WorkerReply, WorkerRequest } from './workerProtocol.js';

/** Distributive Omit, so each request variant keeps its own fields. */
type Request = WorkerRequest extends infer R ? (R extends WorkerRequest ? Omit<R, 'seq'> : never) : never;

/** Small young generations make workers collect their dead block copies early (memory bound). */
const WORKER_LIMITS = { maxYoungGenerationSizeMb: 8 };

/**
 * Where the worker's code comes from. The single-executable build sets `globalThis.__blocksafeWorkerSource`
 * to the bundled worker script; a tsx (TypeScript) run registers tsx inside the worker first.
 */
function spawn(init: WorkerInit): Worker {
  const embedded = (globalThis as { __blocksafeWorkerSource?: string }).__blocksafeWorkerSource;
  if (embedded) return new Worker(embedded, { eval: true, workerData: init, resourceLimits: WORKER_LIMITS });
  const self = fileURLToPath(import.meta.url);
  if (self.endsWith('.ts')) {
    const target = new URL('./worker.ts', import.meta.url).href;
    const boot = `import('tsx/esm/api').then((api) => { api.register(); return import(${JSON.stringify(target)}); })`;
    return new Worker(boot, { eval: true, workerData: init, resourceLimits: WORKER_LIMITS });
  }
  return new Worker(new URL('./worker.js', import.meta.url), { workerData: init, resourceLimits: WORKER_LIMITS });
}

interface Pending {
  resolve: (r: WorkerReply) => void;
  reject: (e: Error) => void;
  worker: number;
}

/** A fixed set of worker threads; each request goes to the least busy one. */
export class WorkerPool {
  private readonly workers: Worker[] = [];
  private readonly load: number[] = [];
  private readonly pending = new Map<number, Pending>();
  private seq = 0;
  private failure: Error | undefined;

  constructor(init: WorkerInit, threads = defaultThreads()) {
    for (let i = 0; i < threads; i++) {
      const w = spawn(init);
      w.unref();
      w.on('message', (reply: WorkerReply) => this.settle(reply));
      w.on('error', (err) => this.fail(err));
      w.on('exit', (code) => {
        if (code !== 0) this.fail(new Error(`pipeline worker exited with code ${code}`));
      });
      this.workers.push(w);
      this.load.push(0);
    }
  }

  get size(): number {
    return this.workers.length;
  }

  private settle(reply: WorkerReply): void {
    const p = this.pending.get(reply.seq);
    if (!p) return;
    this.pending.delete(reply.seq);
    this.load[p.worker]!--;
    p.resolve(reply);
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const p of this.pending.values()) p.reject(new BlocksafeError(`Internal error in the block pipeline: ${err.message}`, 1, { cause: err }));
    this.pending.clear();
  }

  request(req: Request, transfer: ArrayBuffer[]): Promise<WorkerReply> {
    if (this.failure) return Promise.reject(new BlocksafeError(`Internal error in the block pipeline: ${this.failure.message}`));
    let best = 0;
    for (let i = 1; i < this.load.length; i++) if (this.load[i]! < this.load[best]!) best = i;
    const seq = ++this.seq;
    this.load[best]!++;
    return new Promise((resolve, reject) => {
      this.pending.set(seq, { resolve, reject, worker: best });
      this.workers[best]!.postMessage({ ...req, seq }, transfer);
    });
  }

  /** Sends new keys to every worker; requests sent after this resolves use them. */
  async updateKeys(keys: import('./workerProtocol.js').WorkerKeys): Promise<void> {
    await Promise.all(
      this.workers.map(
        (w, i) =>
          new Promise<void>((resolve, reject) => {
            const seq = ++this.seq;
            this.load[i]!++;
            this.pending.set(seq, { resolve: () => resolve(), reject, worker: i });
            w.postMessage({ op: 'keys', ...keys, seq });
          }),
      ),
    );
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

export function defaultThreads(): number {
  return Math.max(1, Math.min(availableParallelism(), 16));
}
