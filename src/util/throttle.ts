/**
 * A token bucket limiting bytes per second (0 = unlimited). Callers await `take(n)` before moving n bytes;
 * bursts up to one second's worth are allowed.
 */
export class Throttle {
  private tokens: number;
  private last = Date.now();
  private chain: Promise<void> = Promise.resolve();

  constructor(readonly bytesPerSecond: number) {
    this.tokens = bytesPerSecond;
  }

  take(n: number): Promise<void> {
    if (this.bytesPerSecond <= 0) return Promise.resolve();
    // Serialize waiters so that they are served in order.
    this.chain = this.chain.then(async () => {
      for (;;) {
        const now = Date.now();
        this.tokens = Math.min(this.bytesPerSecond, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
        this.last = now;
        if (this.tokens >= n || this.tokens >= this.bytesPerSecond) {
          this.tokens -= n;
          return;
        }
        await new Promise((r) => setTimeout(r, Math.ceil(((n - this.tokens) / this.bytesPerSecond) * 1000)));
      }
    });
    return this.chain;
  }
}

export const UNLIMITED = new Throttle(0);
