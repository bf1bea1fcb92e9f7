import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { constants as zlibConstants, zstdCompressSync, zstdDecompressSync } from 'node:zlib';
import { FormatError, IntegrityError } from '../errors.js';
import { zstdBound, type ZstdWorkspace } from './zstdWorkspace.js';

/**
 * The one object codec. Every object in a blob store (blocks, manifests, attributes, leases, the cleanup
 * generation; not the key slots and the keyring, which keys.ts seals itself) is
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

/**
 * Largest plaintext an object of each type may decompress to, unless the caller knows better (a block's
 * exact size comes from the index: the pipeline passes it as `maxPlain`). zstd frames are checked against
 * it before anything is allocated (issue 14, item 8): a 32 KiB frame of RLE blocks expands to 1 GiB.
 */
export const MAX_PLAIN: Readonly<Record<ObjectType, number>> = {
  [ObjectType.Block]: 64 * 1024 * 1024, // the largest block size a repository can have
  [ObjectType.Keyring]: 16 * 1024 * 1024,
  [ObjectType.Attributes]: 16 * 1024 * 1024,
  // 32 bytes per block: 2 GiB is a 256 TiB volume in 4 MiB blocks. Bounded more tightly only once the
  // reader knows the expected size before decoding (see docs/SECURITY.md).
  // A 16 TiB volume of 4 MiB blocks; readers check the exact length against the header (engine/manifest.ts).
  [ObjectType.Manifest]: 160 * 1024 * 1024,
  [ObjectType.Lock]: 64 * 1024,
  [ObjectType.GcState]: 4096,
};

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
    const packed = zstdCompress(plain, opts.zstdLevel);
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

/** AEAD input and output travel in pieces this large: below malloc's mmap threshold (128 KiB), so they are reused heap memory, not fresh pages per block. */
const CIPHER_PIECE = 64 * 1024;

/** Room encodeBlockInPlace needs in front of the block for the object's header (with nonce). */
export const OBJECT_HEADROOM = FIXED_HEADER + NONCE_BYTES;

/**
 * encodeObject for the block pipeline, in place and without block-sized allocations: the block is the
 * `length` bytes at `at` in `mem`, with OBJECT_HEADROOM bytes free before it and TAG_BYTES after. The object
 * is written over it — header in front, payload (compressed via `scratch`, at least zstdBound(length) bytes,
 * or the block itself) encrypted in place piece by piece, tag behind — and [start, length] of the object in
 * `mem` is returned. Same format as encodeObject. The block's bytes are gone afterwards.
 */
export function encodeBlockInPlace(mem: Uint8Array, at: number, length: number, keys: CodecKeys, opts: EncodeOptions, zstd: ZstdWorkspace, scratch: Uint8Array): [number, number] {
  const encrypted = keys.dataKeys.size > 0;
  const headerLen = FIXED_HEADER + (encrypted ? NONCE_BYTES : 0);
  if (at < OBJECT_HEADROOM || mem.length < at + length + TAG_BYTES || scratch.length < zstdBound(length)) throw new FormatError('Object buffer is too small.');
  const m = Buffer.from(mem.buffer, mem.byteOffset, mem.byteLength);
  const plain = m.subarray(at, at + length);
  let payload = plain;
  let compression = Compression.None;
  if (opts.compress && length > 0 && looksCompressible(plain, opts.zstdLevel, zstd, scratch)) {
    const n = zstd.compressInto(plain, scratch);
    // Incompressible data is stored as is: smaller object and no decompression on restore.
    if (n >= 0 && n < length) {
      payload = Buffer.from(scratch.buffer, scratch.byteOffset, n);
      compression = Compression.Zstd;
    }
  }
  const start = at - headerLen;
  OBJECT_MAGIC.copy(m, start);
  m[start + 4] = OBJECT_FORMAT;
  m[start + 5] = opts.type;
  m[start + 6] = compression;
  m[start + 7] = encrypted ? Cipher.ChaCha20Poly1305 : Cipher.None;
  m.writeUInt32BE(encrypted ? keys.currentKeyId : 0, start + 8);
  if (!encrypted) {
    if (payload !== plain) m.set(payload, at);
    return [start, headerLen + payload.length];
  }
  const key = keys.dataKeys.get(keys.currentKeyId);
  if (!key) throw new FormatError(`Data key ${keys.currentKeyId} is missing from the keyring.`);
  const nonce = randomBytes(NONCE_BYTES);
  nonce.copy(m, start + FIXED_HEADER);
  const header = Buffer.from(m.subarray(start, at)); // a copy: `mem` may be shared memory
  const cipher = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(opts.context ? Buffer.concat([header, opts.context]) : header, { plaintextLength: payload.length });
  let end = at;
  for (let i = 0; i < payload.length; i += CIPHER_PIECE) {
    // In place for an uncompressed block: each piece is read completely before its ciphertext replaces it.
    const piece = cipher.update(payload.subarray(i, Math.min(payload.length, i + CIPHER_PIECE)));
    m.set(piece, end);
    end += piece.length;
  }
  const rest = cipher.final();
  m.set(rest, end);
  end += rest.length;
  cipher.getAuthTag().copy(m, end);
  return [start, end + TAG_BYTES - start];
}

/**
 * decodeObject for a block of `size` bytes, in place and without block-sized allocations: the object is the
 * first `length` bytes of `mem`. It is authenticated and decrypted in place; a compressed payload is then
 * decompressed into `scratch` and copied to the start of `mem`. Returns where in `mem` the block now starts.
 * `mem` holds unauthenticated bytes after a failure: nothing in it may be used unless this returns.
 */
export function decodeBlockInPlace(mem: Uint8Array, length: number, size: number, keys: CodecKeys, context: Uint8Array, zstd: ZstdWorkspace, scratch: Uint8Array): number {
  const obj = Buffer.from(mem.buffer, mem.byteOffset, length);
  if (obj.length < FIXED_HEADER || !obj.subarray(0, 4).equals(OBJECT_MAGIC)) throw new IntegrityError('Object header is damaged (bad magic or truncated).');
  if (obj[4]! > OBJECT_FORMAT) throw new FormatError(`Object format ${obj[4]} is newer than this blocksafe understands (${OBJECT_FORMAT}); upgrade blocksafe.`);
  if (obj[5] !== ObjectType.Block) throw new IntegrityError('object is not a block object');
  const compression = obj[6] as Compression;
  const cipher = obj[7] as Cipher;
  const keyId = obj.readUInt32BE(8);
  if (compression !== Compression.None && compression !== Compression.Zstd) throw new FormatError(`Object uses unknown compression ${compression}; upgrade blocksafe.`);
  let headerLen = FIXED_HEADER;
  let tagLen = 0;
  if (cipher === Cipher.None) {
    if (keys.dataKeys.size > 0) throw new IntegrityError('Object is not encrypted in an encrypted repository (it may have been replaced).');
  } else if (cipher === Cipher.ChaCha20Poly1305) {
    headerLen += NONCE_BYTES;
    tagLen = TAG_BYTES;
    if (obj.length < headerLen + TAG_BYTES) throw new IntegrityError('Object is truncated.');
  } else throw new FormatError(`Object uses unknown cipher ${cipher}; upgrade blocksafe.`);
  const body = obj.subarray(headerLen, obj.length - tagLen);
  if (compression === Compression.None && body.length !== size) throw new IntegrityError(`block has ${body.length} bytes instead of ${size}`);
  if (cipher === Cipher.ChaCha20Poly1305) {
    const key = keys.dataKeys.get(keyId);
    if (!key) throw new IntegrityError(`Object is encrypted with unknown key id ${keyId}.`);
    const header = Buffer.from(obj.subarray(0, headerLen));
    const decipher = createDecipheriv('chacha20-poly1305', key, Buffer.from(obj.subarray(FIXED_HEADER, headerLen)), { authTagLength: TAG_BYTES });
    decipher.setAAD(Buffer.concat([header, context]), { plaintextLength: body.length });
    decipher.setAuthTag(Buffer.from(obj.subarray(obj.length - TAG_BYTES)));
    // In place: each piece is read completely before its plaintext replaces it.
    let at = 0;
    for (let i = 0; i < body.length; i += CIPHER_PIECE) at += decipher.update(body.subarray(i, Math.min(body.length, i + CIPHER_PIECE))).copy(body, at);
    try {
      decipher.final();
    } catch (err) {
      throw new IntegrityError('Object failed authentication (altered, truncated or replaced).', { cause: err });
    }
  }
  if (compression === Compression.None) return headerLen;
  const declared = zstdDeclaredSize(body);
  if (declared !== undefined && declared !== size) throw new IntegrityError(`Object payload claims to decompress to ${declared} bytes instead of ${size}; it was not decompressed.`);
  if (scratch.length < size || mem.length < size) throw new IntegrityError(`Block of ${size} bytes is larger than this repository's blocks.`);
  const plain = Buffer.from(scratch.buffer, scratch.byteOffset, size);
  zstd.decompressInto(body, plain);
  plain.copy(Buffer.from(mem.buffer, mem.byteOffset, size));
  return 0;
}

const PROBE = 64 * 1024;

/**
 * Compressing a random (already compressed, encrypted) 4 MiB block only to throw the result away costs CPU
 * and a block-sized allocation; a 64 KiB sample that does not shrink by 2 % says the block will not either.
 */
function looksCompressible(plain: Uint8Array, level: number, zstd?: ZstdWorkspace, scratch?: Uint8Array): boolean {
  // `scratch` (the object's payload area) has room for the sample's frame: the block is larger than 2 samples.
  if (plain.length <= 2 * PROBE) return true;
  const mid = Math.floor(plain.length / 2);
  const sample = plain.subarray(mid, mid + PROBE);
  if (zstd && scratch) {
    const n = zstd.compressInto(sample, scratch);
    return n >= 0 && n < PROBE * 0.98;
  }
  return zstdCompress(sample, level).length < PROBE * 0.98;
}

/**
 * node:zlib's zstd (no native addon; docs/BINARY.md has the measurements against zstd-napi). The content
 * size is pledged, so it is written into the frame header (what decompression checks first), and the
 * output buffer has room for the whole result (ZSTD_compressBound plus slack), so zstd compresses in one
 * pass instead of streaming through 16 KiB chunks (1.1x faster on text, 1.7x on random data here).
 */
function zstdCompress(plain: Uint8Array, level: number): Buffer {
  return zstdCompressSync(plain, {
    params: { [zlibConstants.ZSTD_c_compressionLevel]: level },
    pledgedSrcSize: plain.length,
    chunkSize: plain.length + (plain.length >>> 7) + 128 * 1024,
  });
}

const ZSTD_MAGIC = 0xfd2fb528;

/**
 * The content size a zstd frame's header declares (undefined when the frame does not say). Throws
 * IntegrityError when `frame` does not start with a zstd frame header (RFC 8878, 3.1.1).
 */
export function zstdDeclaredSize(frame: Uint8Array): number | undefined {
  const b = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  if (b.length < 5 || b.readUInt32LE(0) !== ZSTD_MAGIC) throw new IntegrityError('Object payload is not a zstd frame.');
  const fhd = b[4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  if (fhd & 0x08) throw new IntegrityError('Object payload has a damaged zstd frame header (reserved bit set).');
  const didBytes = [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  const at = 5 + (singleSegment ? 0 : 1) + didBytes;
  if (b.length < at + fcsBytes) throw new IntegrityError('Object payload has a truncated zstd frame header.');
  switch (fcsBytes) {
    case 0:
      return undefined;
    case 1:
      return b[at]!;
    case 2:
      return b.readUInt16LE(at) + 256;
    case 4:
      return b.readUInt32LE(at);
    default: {
      const n = b.readBigUInt64LE(at);
      return n > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(n);
    }
  }
}

/**
 * Decompresses `payload` to at most `maxPlain` bytes without ever holding more: the frame's declared
 * content size is checked before anything is allocated, the decoder's window is capped at the next power
 * of two of `maxPlain` (a frame asking for a larger window is refused, not served with a 128 MiB buffer),
 * and output beyond `maxPlain` stops the decoder (node:zlib's maxOutputLength).
 */
function zstdDecompress(payload: Buffer, maxPlain: number): Buffer {
  const declared = zstdDeclaredSize(payload);
  if (declared !== undefined && declared > maxPlain) {
    throw new IntegrityError(`Object payload claims to decompress to ${declared} bytes, more than the ${maxPlain} it may have; it was not decompressed.`);
  }
  const limit = Math.max(1, maxPlain);
  const windowLog = Math.min(31, Math.max(10, Math.ceil(Math.log2(limit))));
  try {
    return zstdDecompressSync(payload, {
      maxOutputLength: limit,
      chunkSize: Math.max(64, Math.min(limit, declared ?? 4 * 1024 * 1024)),
      params: { [zlibConstants.ZSTD_d_windowLogMax]: windowLog },
    });
  } catch (err) {
    if ((err as NodeJS.ErrnoException)?.code === 'ERR_BUFFER_TOO_LARGE') {
      throw new IntegrityError(`Object payload decompresses to more than the ${maxPlain} bytes it may have; decompression was stopped.`, { cause: err });
    }
    throw new IntegrityError('Object payload does not decompress.', { cause: err });
  }
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

export interface DecodeOptions {
  /** Largest plaintext accepted (default MAX_PLAIN of the object's type); a block's reader passes its exact size. */
  maxPlain?: number;
}

export function decodeObject(raw: Uint8Array, keys: CodecKeys, context?: Uint8Array, opts: DecodeOptions = {}): DecodedObject {
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
  const maxPlain = opts.maxPlain ?? MAX_PLAIN[type] ?? MAX_PLAIN[ObjectType.Block];
  let plain: Buffer;
  if (compression === Compression.None) plain = payload;
  else if (compression === Compression.Zstd) plain = zstdDecompress(payload, maxPlain);
  else throw new FormatError(`Object uses unknown compression ${compression}; upgrade blocksafe.`);
  return { type, keyId, plain };
}
