/**
 * Turns the extents of an rbd diff stream into repository blocks, in volume order.
 *
 * A block the stream touches comes out with the bytes the stream gave (zeros where it said 'z') and the
 * byte ranges it covered. What the rest of the block holds is for the caller to decide: after a full
 * export-diff (no --from-snap) unlisted bytes are zeros; after an incremental one they are the base
 * version's bytes. That is why a discard of part of a block never zeroes the rest of it.
 */
import type { DiffExtent, RbdDiffReader } from './rbdDiff.js';

export interface TouchedBlock {
  index: number;
  /** The block's bytes as far as the stream gave them; zeros elsewhere. */
  data: Buffer;
  /** Covered byte ranges [from, to) inside the block, ordered and merged. */
  covered: [number, number][];
  /** The stream covered every byte of the block. */
  full: boolean;
  /** Every covered byte came from a zero ('z') record. */
  zeroOnly: boolean;
}

export class DiffBlocks {
  private ext: DiffExtent | null = null;
  /** Absolute offset of the next unconsumed byte of `ext`. */
  private pos = 0;
  private ended = false;
  private started = false;
  private pending: TouchedBlock | null = null;
  private failure: unknown = null;
  private chain: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly reader: RbdDiffReader,
    private readonly blockSize: number,
    private readonly size: number,
  ) {}

  /**
   * Block i if the stream touches it, else null. Calls are served one at a time in call order and must
   * ask for increasing i (orderedWindow starts blocks in order); blocks skipped over (a resumed backup)
   * are read from the stream and dropped.
   */
  take(i: number): Promise<TouchedBlock | null> {
    const p = this.chain.then(() => this.takeNow(i));
    this.chain = p.catch(() => undefined);
    return p;
  }

  /** Reads the stream to its end record; an error if it still holds extents (it cannot: they are bounded by the size). */
  async finish(): Promise<void> {
    const last = await this.take(Number.MAX_SAFE_INTEGER);
    if (last) throw new Error('unreachable: a block beyond the image');
  }

  private async takeNow(i: number): Promise<TouchedBlock | null> {
    if (this.failure) throw this.failure;
    try {
      while (!this.pending || this.pending.index < i) {
        if (this.ended) return null;
        this.pending = await this.nextBlock();
        if (!this.pending) {
          this.ended = true;
          return null;
        }
      }
      if (this.pending.index !== i) return null;
      const t = this.pending;
      this.pending = null;
      return t;
    } catch (err) {
      this.failure = err;
      throw err;
    }
  }

  /** The next extent with a length, or null after the end record. */
  private async advance(): Promise<DiffExtent | null> {
    for (;;) {
      const e = await this.reader.nextExtent();
      if (!e || e.length > 0) {
        this.ext = e;
        if (e) this.pos = e.offset;
        return e;
      }
    }
  }

  private async nextBlock(): Promise<TouchedBlock | null> {
    if (!this.started) {
      this.started = true;
      await this.advance();
    }
    if (!this.ext) return null;
    const bs = this.blockSize;
    const index = Math.floor(this.pos / bs);
    const start = index * bs;
    const length = Math.min(bs, this.size - start);
    const data = Buffer.alloc(length);
    const covered: [number, number][] = [];
    let zeroOnly = true;
    let total = 0;
    while (this.ext && this.pos < start + length) {
      const e = this.ext;
      const end = Math.min(e.offset + e.length, start + length);
      if (!e.zero) {
        await this.reader.readData(data, this.pos - start, end - this.pos);
        zeroOnly = false;
      }
      const last = covered[covered.length - 1];
      if (last && last[1] === this.pos - start) last[1] = end - start;
      else covered.push([this.pos - start, end - start]);
      total += end - this.pos;
      this.pos = end;
      if (this.pos >= e.offset + e.length) await this.advance();
    }
    return { index, data, covered, full: total === length, zeroOnly };
  }
}
