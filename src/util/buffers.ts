/**
 * An ArrayBuffer holding exactly this buffer's bytes, safe to transfer to another thread: zero-copy when the
 * buffer owns its whole ArrayBuffer, a copy when it is a slice of a shared one (e.g. Node's small-buffer pool).
 */
export function ownArrayBuffer(b: Uint8Array): ArrayBuffer {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.buffer instanceof ArrayBuffer) return b.buffer;
  const copy = new ArrayBuffer(b.byteLength);
  new Uint8Array(copy).set(b);
  return copy;
}

/**
 * Reuses block-sized buffers so that a long backup does not leave garbage collection behind with hundreds of
 * MiB of dead 4 MiB ArrayBuffers (peak RSS must not depend on the volume size). Buffers travel to worker
 * threads and back as transferred ArrayBuffers; only whole, block-sized ones are pooled.
 */
export class BufferPool {
  private readonly free: ArrayBuffer[] = [];

  constructor(
    readonly size: number,
    private readonly max: number,
  ) {}

  /** A buffer of `length` bytes that owns its ArrayBuffer (so it can be transferred). */
  take(length: number): Buffer {
    const ab = length === this.size ? this.free.pop() : undefined;
    return ab ? Buffer.from(ab) : Buffer.allocUnsafeSlow(length);
  }

  /** Hands a buffer back for reuse (ignored unless it is a whole block-sized ArrayBuffer). */
  give(b: Uint8Array): void {
    if (b.byteOffset === 0 && b.byteLength === this.size && b.buffer.byteLength === this.size && b.buffer instanceof ArrayBuffer && this.free.length < this.max) {
      this.free.push(b.buffer);
    }
  }
}
