import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/**
 * An explicit garbage collection, used every few blocks: V8 lets each thread accumulate tens of MiB of dead
 * ArrayBuffers (compressed and encrypted block copies) before it collects on its own, and with a worker per
 * core that alone would exceed the memory bound. A full collection of these small heaps takes ~1 ms.
 */
type Collector = (opts?: { type: 'minor' | 'major'; execution?: 'sync' | 'async' }) => void;

function makeCollector(): Collector {
  try {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as unknown;
    if (typeof gc === 'function') return gc as Collector;
  } catch {
    // not available: rely on V8's own heuristics
  }
  return () => undefined;
}

const collector = makeCollector();

export const collectGarbage = (): void => collector();

/**
 * A young-generation collection only (a scavenge: ~0.1 ms on a worker's small heap). It frees the dead
 * buffers the AEAD returns piece by piece (codec/object.ts), whose memory V8 would otherwise let grow by
 * tens of MiB per thread before collecting on its own.
 */
export const collectYoung = (): void => collector({ type: 'minor' });

/** Calls collectGarbage once per `every` calls. */
export function gcEvery(every: number): () => void {
  let n = 0;
  return () => {
    if (++n % every === 0) collectGarbage();
  };
}
