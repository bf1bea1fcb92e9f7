import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/**
 * An explicit garbage collection, used every few blocks: V8 lets each thread accumulate tens of MiB of dead
 * ArrayBuffers (compressed and encrypted block copies) before it collects on its own, and with a worker per
 * core that alone would exceed the memory bound. A full collection of these small heaps takes ~1 ms.
 */
function makeCollector(): () => void {
  try {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as unknown;
    if (typeof gc === 'function') return gc as () => void;
  } catch {
    // not available: rely on V8's own heuristics
  }
  return () => undefined;
}

export const collectGarbage = makeCollector();

/** Calls collectGarbage once per `every` calls. */
export function gcEvery(every: number): () => void {
  let n = 0;
  return () => {
    if (++n % every === 0) collectGarbage();
  };
}
