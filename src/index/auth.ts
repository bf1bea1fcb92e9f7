import { createHmac, timingSafeEqual } from 'node:crypto';
import { IntegrityError } from '../errors.js';

/** Bytes of the MAC in front of every authenticated index value (HMAC-SHA-256 truncated to 128 bits). */
export const INDEX_MAC_BYTES = 16;

/**
 * Authentication of the LMDB index. The index of a directory repository lives on the medium itself (a USB
 * disk anyone may have edited), so every value that restore, scrub, cleanup or a backup relies on carries a
 * keyed MAC over (table, key, value) under a key derived from the repository's MAC key. An edited, swapped
 * or foreign value is refused (exit 3) instead of believed; what the MAC cannot stop (a whole old value put
 * back for the same key, an entry deleted) is covered by checking against the store's manifests
 * (docs/SECURITY.md).
 */
export class IndexAuth {
  private readonly key: Buffer;

  constructor(macKey: Uint8Array) {
    this.key = createHmac('sha256', macKey).update('blocksafe index authentication v1').digest();
  }

  private mac(table: string, key: Uint8Array | string, payload: Uint8Array): Buffer {
    const h = createHmac('sha256', this.key);
    const keyBytes = typeof key === 'string' ? Buffer.from(key, 'utf8') : key;
    const lengths = Buffer.alloc(8);
    lengths.writeUInt32BE(table.length, 0);
    lengths.writeUInt32BE(keyBytes.length, 4);
    return h.update(lengths).update(table).update(keyBytes).update(payload).digest().subarray(0, INDEX_MAC_BYTES);
  }

  /** `mac ‖ payload`, the stored form of a value. */
  seal(table: string, key: Uint8Array | string, payload: Uint8Array): Buffer {
    return Buffer.concat([this.mac(table, key, payload), payload]);
  }

  /** The payload of a stored value, or an IntegrityError when it was not sealed by this repository's key. */
  open(table: string, key: Uint8Array | string, stored: Uint8Array): Buffer {
    const value = Buffer.from(stored.buffer, stored.byteOffset, stored.byteLength);
    if (value.length < INDEX_MAC_BYTES) throw tampered(table, key);
    const payload = value.subarray(INDEX_MAC_BYTES);
    if (!timingSafeEqual(value.subarray(0, INDEX_MAC_BYTES), this.mac(table, key, payload))) throw tampered(table, key);
    return payload;
  }

  sealJson(table: string, key: Uint8Array | string, value: unknown): Buffer {
    return this.seal(table, key, Buffer.from(JSON.stringify(value), 'utf8'));
  }

  openJson<T>(table: string, key: Uint8Array | string, stored: Uint8Array): T {
    const payload = this.open(table, key, stored);
    try {
      return JSON.parse(payload.toString('utf8')) as T;
    } catch {
      throw tampered(table, key);
    }
  }
}

function tampered(table: string, key: Uint8Array | string): IntegrityError {
  const what = typeof key === 'string' ? key : describeKey(table, Buffer.from(key));
  return new IntegrityError(
    `The index entry ${table}/${what} fails authentication (the index was edited, damaged, or belongs to another repository); nothing was changed: run "blocksafe index rebuild" to recreate it from the store.`,
  );
}

/** A binary key as a user can place it: a block map chunk as `<version id> chunk <n>`, anything else as hex. */
function describeKey(table: string, key: Buffer): string {
  const nul = key.indexOf(0);
  if (table === 'maps' && nul > 0 && key.length === nul + 5) return `${key.subarray(0, nul).toString('latin1')} chunk ${key.readUInt32BE(nul + 1)}`;
  return key.toString('hex').slice(0, 16);
}
