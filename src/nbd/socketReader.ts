import type { Socket } from 'node:net';

/** The peer closed the connection (or it failed) while a read was waiting. */
export class ConnectionClosed extends Error {
  constructor(message = 'connection closed') {
    super(message);
    this.name = 'ConnectionClosed';
  }
}

/**
 * Exact-length reads from a socket ("give me the next 28 bytes"), with backpressure: the socket is paused
 * while more than `highWater` bytes are buffered and no read is waiting, so a client that sends faster than
 * the server works cannot make it buffer without bound.
 */
export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private closed: Error | null = null;

  constructor(
    private readonly socket: Socket,
    private readonly highWater = 1024 * 1024,
  ) {
    socket.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.buffered += b.length;
      this.serve();
      if (this.buffered > this.highWater && !this.waiter) socket.pause();
    });
    const end = (err?: Error) => {
      if (!this.closed) this.closed = new ConnectionClosed(err ? `connection failed: ${err.message}` : 'connection closed by the client');
      this.serve();
    };
    socket.on('end', () => end());
    socket.on('close', () => end());
    socket.on('error', (err) => end(err));
  }

  /** The next `n` bytes; rejects with ConnectionClosed if the connection ends first. */
  read(n: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('SocketReader: concurrent reads'));
    return new Promise<Buffer>((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.serve();
      if (this.waiter && this.socket.isPaused()) this.socket.resume();
    });
  }

  /** Reads and drops `n` bytes (in bounded pieces). */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      const piece = Math.min(n, 1024 * 1024);
      await this.read(piece);
      n -= piece;
    }
  }

  private serve(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= w.n) {
      this.waiter = null;
      w.resolve(this.take(w.n));
      if (this.buffered <= this.highWater && this.socket.isPaused() && !this.closed) this.socket.resume();
    } else if (this.closed) {
      this.waiter = null;
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
