/**
 * A set of 32-byte checksums packed into one sorted buffer: 32 bytes per entry instead of a string or a
 * Buffer object each (a million blocks: 32 MiB, not hundreds). Add everything, then `seal()`, then query.
 */
export class ChecksumSet {
  private parts: Buffer[] = [];
  private pending: Buffer[] = [];
  private packed = Buffer.alloc(0);
  private count = 0;

  add(checksum: Uint8Array): void {
    this.pending.push(Buffer.from(checksum));
    if (this.pending.length >= 65536) this.flushPending();
  }

  private flushPending(): void {
    if (this.pending.length) this.parts.push(Buffer.concat(this.pending));
    this.pending = [];
  }

  /** Sorts and removes duplicates; the set is read-only afterwards. */
  seal(): this {
    this.flushPending();
    const all = Buffer.concat([this.packed, ...this.parts]);
    this.parts = [];
    const n = all.length / 32;
    const order = Array.from({ length: n }, (_, i) => i);
    order.sort((a, b) => all.compare(all, b * 32, b * 32 + 32, a * 32, a * 32 + 32)); // entry a against entry b
    const out = Buffer.alloc(all.length);
    let m = 0;
    for (const i of order) {
      if (m > 0 && out.compare(all, i * 32, i * 32 + 32, (m - 1) * 32, m * 32) === 0) continue;
      all.copy(out, m * 32, i * 32, i * 32 + 32);
      m++;
    }
    this.packed = out.subarray(0, m * 32);
    this.count = m;
    return this;
  }

  get size(): number {
    return this.count;
  }

  has(checksum: Uint8Array): boolean {
    const key = Buffer.from(checksum.buffer, checksum.byteOffset, checksum.byteLength);
    let lo = 0;
    let hi = this.count - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const c = this.packed.compare(key, 0, 32, mid * 32, mid * 32 + 32);
      if (c === 0) return true;
      if (c < 0) lo = mid + 1;
      else hi = mid - 1;
    }
    return false;
  }
}
