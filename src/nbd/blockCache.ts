import type { BlockPipeline } from '../engine/blockPipeline.js';

/** At most this many bytes of decoded blocks are kept (and at least 2, at most 8 blocks). */
export const CACHE_BYTES = 64 * 2 ** 20;
export const CACHE_MAX_BLOCKS = 8;

export function cacheCapacity(blockSize: number): number {
  return Math.max(2, Math.min(CACHE_MAX_BLOCKS, Math.floor(CACHE_BYTES / blockSize)));
}

/**
 * A small LRU of decoded (verified plaintext) blocks, shared by every export and client of one server and
 * keyed by checksum, so a block used by several versions or several places is fetched once. Concurrent
 * requests for the same block share one load; a failed load is not cached (the next request retries).
 * Memory: capacity × block size, plus blocks being loaded by requests in flight.
 */
export class BlockCache {
  /** Insertion order = recency order (a hit moves the entry to the end). */
  private readonly entries = new Map<string, Promise<Buffer>>();
  hits = 0;
  misses = 0;

  constructor(
    private readonly pipeline: BlockPipeline,
    readonly capacity: number,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  get(checksum: Buffer, size: number): Promise<Buffer> {
    const key = checksum.toString('hex');
    const hit = this.entries.get(key);
    if (hit) {
      this.hits++;
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit;
    }
    this.misses++;
    const load = this.pipeline.load(checksum, size);
    this.entries.set(key, load);
    load.catch(() => {
      if (this.entries.get(key) === load) this.entries.delete(key);
    });
    while (this.entries.size > this.capacity) {
      const oldest = this.entries.keys().next().value as string;
      this.entries.delete(oldest);
    }
    return load;
  }
}
