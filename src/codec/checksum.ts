import { createHmac } from 'node:crypto';

/** Length in bytes of a block identity (HMAC-SHA-256). */
export const CHECKSUM_BYTES = 32;

/**
 * Block identity: a keyed MAC of the plaintext block. Keyed so that object names reveal nothing about
 * content (an unkeyed hash would let anyone holding the store test for a known block).
 */
export function blockChecksum(macKey: Uint8Array, data: Uint8Array): Buffer {
  return createHmac('sha256', macKey).update(data).digest();
}

const ZERO_PAGE = Buffer.alloc(64 * 1024);

/** True when every byte is zero; memcmp against a zero page is far faster than a byte loop. */
export function isAllZero(data: Uint8Array): boolean {
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  for (let off = 0; off < buf.length; off += ZERO_PAGE.length) {
    const len = Math.min(ZERO_PAGE.length, buf.length - off);
    if (buf.compare(ZERO_PAGE, 0, len, off, off + len) !== 0) return false;
  }
  return true;
}
