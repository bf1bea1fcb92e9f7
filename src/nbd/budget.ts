/**
 * A byte budget shared by all connections of a server: request data in flight (write payloads being
 * received and applied, read results being fetched and sent) takes from it, so the memory they use is
 * bounded whatever the number of clients. Waiters are served first come, first served (a large request
 * is not starved by a stream of small ones).
 */
export class ByteBudget {
  private used = 0;
  private readonly waiters: { n: number; resolve: () => void }[] = [];

  constructor(readonly total: number) {}

  get inUse(): number {
    return this.used;
  }

  /** Takes `n` bytes (at most the total), waiting until they are free. */
  acquire(n: number): Promise<void> {
    n = Math.min(n, this.total);
    if (this.waiters.length === 0 && this.used + n <= this.total) {
      this.used += n;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiters.push({ n, resolve }));
  }

  release(n: number): void {
    n = Math.min(n, this.total);
    this.used -= n;
    while (this.waiters.length > 0 && this.used + this.waiters[0]!.n <= this.total) {
      const w = this.waiters.shift()!;
      this.used += w.n;
      w.resolve();
    }
  }
}
