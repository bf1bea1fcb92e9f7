import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { compress as zstdCompress, decompress as zstdDecompress } from 'zstd-napi';
import { FormatError, IntegrityError } from '../errors.js';

/**
 * The one object codec. Every object in a blob store (blocks, manifests, the keyring) is
 *
 *   magic "BSOB" | format u8 | type u8 | compression u8 | cipher u8 | key id u32 BE | nonce (12, if ciphered)
 *   | payload | tag (16, if ciphered)
 *
 * The header (everything before the payload) and a caller-supplied context (e.g. the object's name) are
 * authenticated as associated data, so an object cannot be moved to another name or have its header edited
 * without the decryption failing. See docs/FORMAT.md.
 */
export const OBJECT_MAGIC = Buffer.from('BSOB', 'ascii');
export const OBJECT_FORMAT = 1;
const FIXED_HEADER = 12;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

export enum ObjectType {
  Block = 1,
  Manifest = 2,
  Keyring = 3,
  Attributes = 4,
  /** A lease in `locks/` (engine/leases.ts). */
  Lock = 5,
  /** `gc/generation`: how many cleanups have deleted objects (engine/indexSync.ts). */
  GcState = 6,
}

export enum Compression {
  None = 0,
  Zstd = 1,
}

export enum Cipher {
  None = 0,
  ChaCha20Poly1305 = 1,
}

export interface CodecKeys {
  /** Key id written into new objects. */
  currentKeyId: number;
  /** Data keys by id; empty when the repository is not encrypted. */
  dataKeys: ReadonlyMap<number, Uint8Array>;
}

export interface EncodeOptions {
  type: ObjectType;
  compress: boolean;
  zstdLevel: number;
  /** Extra authenticated data binding the object to its place (its name). */
  context?: Uint8Array;
}

export function encodeObject(plain: Uint8Array, keys: CodecKeys, opts: EncodeOptions): Buffer {
  let payload: Uint8Array = plain;
  let compression = Compression.None;
  if (opts.compress && plain.length > 0 && looksCompressible(plain, opts.zstdLevel)) {
    const packed = zstdCompress(plain, { compressionLevel: opts.zstdLevel });
    // Incompressible data is stored as is: smaller object and no decompression on restore.
    if (packed.length < plain.length) {
      payload = packed;
      compression = Compression.Zstd;
    }
  }
  const encrypted = keys.dataKeys.size > 0;
  const header = Buffer.alloc(FIXED_HEADER + (encrypted ? NONCE_BYTES : 0));
  OBJECT_MAGIC.copy(header, 0);
  header[4] = OBJECT_FORMAT;
  header[5] = opts.type;
  header[6] = compression;
  header[7] = encrypted ? Cipher.ChaCha20Poly1305 : Cipher.None;
  header.writeUInt32BE(encrypted ? keys.currentKeyId : 0, 8);
  if (!encrypted) return Buffer.concat([header, payload]);

  const key = keys.dataKeys.get(keys.currentKeyId);
  if (!key) throw new FormatError(`Data key ${keys.currentKeyId} is missing from the keyring.`);
  const nonce = randomBytes(NONCE_BYTES);
  nonce.copy(header, FIXED_HEADER);
  const cipher = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(opts.context ? Buffer.concat([header, opts.context]) : header, { plaintextLength: payload.length });
  const body = cipher.update(payload);
  cipher.final();
  return Buffer.concat([header, body, cipher.getAuthTag()]);
}

const PROBE = 64 * 1024;

/**
 * Compressing a random (already compressed, encrypted) 4 MiB block only to throw the result away costs CPU
 * and a block-sized allocation; a 64 KiB sample that does not shrink by 2 % says the block will not either.
 */
function looksCompressible(plain: Uint8Array, level: number): boolean {
  if (plain.length <= 2 * PROBE) return true;
  const mid = Math.floor(plain.length / 2);
  const sample = plain.subarray(mid, mid + PROBE);
  return zstdCompress(sample, { compressionLevel: level }).length < PROBE * 0.98;
}

export interface DecodedObject {
  type: ObjectType;
  keyId: number;
  plain: Buffer;
}

/** Key id of an object without decrypting it (rekey and stats use it). */
export function objectKeyId(obj: Uint8Array): number {
  if (obj.length < FIXED_HEADER) throw new IntegrityError('Object is truncated (shorter than its header).');
  return Buffer.from(obj.buffer, obj.byteOffset, obj.byteLength).readUInt32BE(8);
}

/**
 * Decodes (authenticates, decompresses) an object. `maxPlain` bounds the plaintext: an object is untrusted
 * input, and a tiny zstd frame can claim or expand to gigabytes; its declared size is checked before any
 * allocation (our frames always declare it).
 */
export function decodeObject(raw: Uint8Array, keys: CodecKeys, context?: Uint8Array, maxPlain = 64 * 2 ** 20): DecodedObject {
  const obj = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
  if (obj.length < FIXED_HEADER || !obj.subarray(0, 4).equals(OBJECT_MAGIC)) {
    throw new IntegrityError('Object header is damaged (bad magic or truncated).');
  }
  const format = obj[4]!;
  if (format > OBJECT_FORMAT) {
    throw new FormatError(`Object format ${format} is newer than this blocksafe understands (${OBJECT_FORMAT}); upgrade blocksafe.`);
  }
  const type = obj[5] as ObjectType;
  const compression = obj[6] as Compression;
  const cipher = obj[7] as Cipher;
  const keyId = obj.readUInt32BE(8);
  let payload: Buffer;
  if (cipher === Cipher.None) {
    if (keys.dataKeys.size > 0) throw new IntegrityError('Object is not encrypted in an encrypted repository (it may have been replaced).');
    payload = obj.subarray(FIXED_HEADER);
  } else if (cipher === Cipher.ChaCha20Poly1305) {
    const key = keys.dataKeys.get(keyId);
    if (!key) throw new IntegrityError(`Object is encrypted with unknown key id ${keyId}.`);
    const headerLen = FIXED_HEADER + NONCE_BYTES;
    if (obj.length < headerLen + TAG_BYTES) throw new IntegrityError('Object is truncated.');
    const header = obj.subarray(0, headerLen);
    const decipher = createDecipheriv('chacha20-poly1305', key, obj.subarray(FIXED_HEADER, headerLen), { authTagLength: TAG_BYTES });
    const body = obj.subarray(headerLen, obj.length - TAG_BYTES);
    decipher.setAAD(context ? Buffer.concat([header, context]) : header, { plaintextLength: body.length });
    decipher.setAuthTag(obj.subarray(obj.length - TAG_BYTES));
    const out = decipher.update(body);
    try {
      decipher.final();
    } catch (err) {
      throw new IntegrityError('Object failed authentication (altered, truncated or replaced).', { cause: err });
    }
    payload = out;
  } else {
    throw new FormatError(`Object uses unknown cipher ${cipher}; upgrade blocksafe.`);
  }
  let plain: Buffer;
  if (compression === Compression.None) plain = payload;
  else if (compression === Compression.Zstd) {
    const declared = zstdContentSize(payload);
    if (declared === null || declared > maxPlain) {
      throw new IntegrityError(`Object payload declares ${declared === null ? 'no' : `a ${declared}-byte`} decompressed size (at most ${maxPlain} allowed).`);
    }
    try {
      plain = zstdDecompress(payload);
    } catch (err) {
      throw new IntegrityError('Object payload does not decompress.', { cause: err });
    }
  } else throw new FormatError(`Object uses unknown compression ${compression}; upgrade blocksafe.`);
  if (plain.length > maxPlain) throw new IntegrityError(`Object payload is larger than allowed (${plain.length} > ${maxPlain} bytes).`);
  return { type, keyId, plain };
}

/**
 * Frame_Content_Size of a single zstd frame (RFC 8878 3.1.1.1), or null when the frame does not declare it
 * or the header is malformed.
 */
export function zstdContentSize(frame: Uint8Array): number | null {
  if (frame.length < 6 || frame[0] !== 0x28 || frame[1] !== 0xb5 || frame[2] !== 0x2f || frame[3] !== 0xfd) return null;
  const fhd = frame[4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const dictIdFlag = fhd & 3;
  const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  if (fcsBytes === 0) return null;
  const at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictIdFlag]!;
  if (frame.length < at + fcsBytes) return null;
  const b = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  switch (fcsBytes) {
    case 1:
      return b[at]!;
    case 2:
      return b.readUInt16LE(at) + 256;
    case 4:
      return b.readUInt32LE(at);
    default: {
      const big = b.readBigUInt64LE(at);
      return big > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(big);
    }
  }
}
