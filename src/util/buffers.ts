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
