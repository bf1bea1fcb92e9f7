import type { Duplex } from 'node:stream';

/** The peer closed the connection (or it failed) while a read was waiting. */
export class ConnectionClosed extends Error {
  constructor(message = 'connection closed') {
    super(message);
    this.name = 'ConnectionClosed';
  }
}

/** The peer stopped sending in the middle of a message for longer than the stall timeout. */
export class StallTimeout extends Error {
  constructor(ms: number) {
    super(`the client stopped sending in the middle of a request for ${ms / 1000} s`);
    this.name = 'StallTimeout';
  }
}

export interface ReadOptions {
  /**
   * Milliseconds without a byte from the peer, while this read has received part of its bytes (or from its
   * start, with `stalledFromStart`), after which it fails with StallTimeout. 0 or absent: no limit.
   */
  stallMs?: number;
  /** The read continues a message already begun (a write payload): the stall timer runs from the start. */
  stalledFromStart?: boolean;
}

/**
 * Exact-length reads from a socket ("give me the next 28 bytes"), with backpressure: the socket is paused
 * while more than `highWater` bytes are buffered and no read is waiting, so a client that sends faster than
 * the server works cannot make it buffer without bound.
 */
export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void; opts: ReadOptions; got: number; timer: NodeJS.Timeout | null } | null = null;
  private closed: Error | null = null;
  private readonly unlisten: () => void;

  constructor(
    private readonly socket: Duplex,
    private readonly highWater = 1024 * 1024,
    /** Called for every chunk received (activity for idle timers). */
    private readonly onData?: () => void,
  ) {
    const data = (b: Buffer) => {
      this.chunks.push(b);
      this.buffered += b.length;
      this.onData?.();
      const w = this.waiter;
      if (w) {
        w.got += b.length;
        w.timer?.refresh();
      }
      this.serve();
      if (this.buffered > this.highWater && !this.waiter) socket.pause();
    };
    const end = (err?: Error) => {
      if (!this.closed) this.closed = new ConnectionClosed(err ? `connection failed: ${err.message}` : 'connection closed by the client');
      this.serve();
    };
    const closed = () => end();
    const failed = (err: Error) => end(err);
    socket.on('data', data).on('end', closed).on('close', closed).on('error', failed);
    this.unlisten = () => socket.off('data', data).off('end', closed).off('close', closed).off('error', failed);
  }

  /** Bytes received and not yet consumed. */
  get pending(): number {
    return this.buffered;
  }

  /** The next `n` bytes; rejects with ConnectionClosed if the connection ends first, StallTimeout if it stalls. */
  read(n: number, opts: ReadOptions = {}): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('SocketReader: concurrent reads'));
    return new Promise<Buffer>((resolve, reject) => {
      this.waiter = { n, resolve, reject, opts, got: this.buffered, timer: null };
      this.serve();
      if (this.waiter) {
        if (opts.stallMs) this.armStall(this.waiter);
        if (this.socket.isPaused()) this.socket.resume();
      }
    });
  }

  /**
   * Reads and drops `n` bytes (a refused write payload) without copying them anywhere: received chunks are
   * released as they arrive, so at most `highWater` plus one socket chunk is ever held.
   */
  async skip(n: number, opts: ReadOptions = {}): Promise<void> {
    let first = true;
    while (n > 0) {
      n -= this.drop(n);
      if (n === 0) break;
      // Wait for at least one more byte (a zero-copy read of it), then drop what is there.
      await this.read(1, { ...opts, stalledFromStart: opts.stalledFromStart || !first });
      first = false;
      n -= 1;
    }
  }

  /** Drops up to `n` buffered bytes; returns how many. */
  private drop(n: number): number {
    let dropped = 0;
    while (dropped < n && this.chunks.length > 0) {
      const c = this.chunks[0]!;
      const take = Math.min(c.length, n - dropped);
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
      dropped += take;
    }
    this.buffered -= dropped;
    if (this.buffered <= this.highWater && this.socket.isPaused() && !this.closed) this.socket.resume();
    return dropped;
  }

  /**
   * Stops reading from the socket (before it is handed to TLS) and returns what was received but not
   * consumed. A waiting read, if any, is rejected.
   */
  detach(): Buffer {
    this.unlisten();
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      if (w.timer) clearTimeout(w.timer);
      w.reject(new ConnectionClosed('reader detached'));
    }
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return rest;
  }

  private armStall(w: NonNullable<SocketReader['waiter']>): void {
    const ms = w.opts.stallMs!;
    // The stall timer runs once part of the message is here (or from the start for a payload); it is
    // refreshed by every chunk, so a slow but moving client is never cut off.
    const check = () => {
      if (this.waiter !== w) return;
      if (w.got > 0 || w.opts.stalledFromStart) {
        this.waiter = null;
        w.reject(new StallTimeout(ms));
      } else {
        w.timer = setTimeout(check, ms).unref();
      }
    };
    w.timer = setTimeout(check, ms).unref();
  }

  private serve(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= w.n) {
      this.waiter = null;
      if (w.timer) clearTimeout(w.timer);
      w.resolve(this.take(w.n));
      if (this.buffered <= this.highWater && this.socket.isPaused() && !this.closed) this.socket.resume();
    } else if (this.closed) {
      this.waiter = null;
      if (w.timer) clearTimeout(w.timer);
      w.reject(this.closed);
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const c = this.chunks[0]!;
      const take = Math.min(c.length, n - done);
      c.copy(out, done, 0, take);
      done += take;
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
    }
    this.buffered -= n;
    return out;
  }
}
