import { IntegrityError } from '../errors.js';
import type { BlockRecord } from './records.js';

/**
 * Fixed binary form of a block record in the index (21 bytes; there is one per stored block):
 * size u32 | stored u32 | key_id u32 | flags u8 (bit 0: valid) | verified f64 (ms since epoch), big-endian.
 */
const RECORD_BYTES = 21;

export function encodeBlockRecord(r: BlockRecord): Buffer {
  const b = Buffer.alloc(RECORD_BYTES);
  b.writeUInt32BE(r.size, 0);
  b.writeUInt32BE(r.stored, 4);
  b.writeUInt32BE(r.key_id, 8);
  b[12] = r.valid ? 1 : 0;
  b.writeDoubleBE(r.verified, 13);
  return b;
}

export function decodeBlockRecord(b: Buffer): BlockRecord {
  if (b.length !== RECORD_BYTES) throw new IntegrityError('A block record in the index has the wrong length; run "blocksafe index rebuild".');
  return { size: b.readUInt32BE(0), stored: b.readUInt32BE(4), key_id: b.readUInt32BE(8), valid: (b[12]! & 1) === 1, verified: b.readDoubleBE(13) };
}

/** Equal for compare-and-set: the same object (size, stored length, key) in the same state; `verified` may differ. */
export function sameBlockRecord(a: BlockRecord, b: BlockRecord): boolean {
  return a.size === b.size && a.stored === b.stored && a.key_id === b.key_id && a.valid === b.valid;
}
