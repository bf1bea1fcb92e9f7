/**
 * The "rbd diff" stream format (Ceph doc/dev/rbd-diff.rst) that `rbd export-diff` writes and
 * `rbd import-diff` reads: a header line, metadata records (from snap 'f', to snap 't', size 's'), then
 * data records ('w' offset length DATA, 'z' offset length) and an end record 'e'. v2 prefixes every
 * record body with its le64 length.
 *
 * The reader treats the stream as untrusted: every length is checked against the image size before a
 * byte is read, data records must come in offset order without overlap, names are bounded, and a stream
 * without its end record is an error (a killed rbd must never look like a short image). Memory is bounded:
 * data is handed on in pieces of at most one block, never a whole record.
 */
import { BlocksafeError } from '../errors.js';

const HEADER_V1 = 'rbd diff v1\n';
const HEADER_V2 = 'rbd diff v2\n';
/** Longest snapshot name accepted in a stream (Ceph names are far shorter). */
const MAX_NAME = 4096;

export class RbdDiffError extends BlocksafeError {}

/** Pulls exact byte counts out of an async stream of chunks (a child's stdout). */
export class ByteReader {
  private chunk: Buffer = Buffer.alloc(0);
  private pos = 0;
  private done = false;
  /** Bytes consumed so far (for messages). */
  consumed = 0;

  constructor(private readonly source: AsyncIterator<Buffer>) {}

  private async fill(): Promise<boolean> {
    while (this.pos >= this.chunk.length) {
      if (this.done) return false;
      const r = await this.source.next();
      if (r.done) {
        this.done = true;
        return false;
      }
      this.chunk = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value);
      this.pos = 0;
    }
    return true;
  }

  /** Copies exactly `n` bytes into `dst` at `at`; false when the stream ended first. */
  async readInto(dst: Buffer, at: number, n: number): Promise<boolean> {
    while (n > 0) {
      if (!(await this.fill())) return false;
      const take = Math.min(n, this.chunk.length - this.pos);
      this.chunk.copy(dst, at, this.pos, this.pos + take);
      this.pos += take;
      this.consumed += take;
      at += take;
      n -= take;
    }
    return true;
  }

  /** Exactly `n` (small) bytes, or an error naming `what` when the stream ends first. */
  async exact(n: number, what: string): Promise<Buffer> {
    const b = Buffer.alloc(n);
    if (!(await this.readInto(b, 0, n))) throw truncated(what, this.consumed);
    return b;
  }

  /** Skips `n` bytes. */
  async skip(n: number, what: string): Promise<void> {
    while (n > 0) {
      if (!(await this.fill())) throw truncated(what, this.consumed);
      const take = Math.min(n, this.chunk.length - this.pos);
      this.pos += take;
      this.consumed += take;
      n -= take;
    }
  }

  /** True when nothing follows. */
  async atEnd(): Promise<boolean> {
    return !(await this.fill());
  }
}

function truncated(what: string, at: number): RbdDiffError {
  return new RbdDiffError(`The rbd diff stream ended in the middle of ${what} (after ${at} bytes); rbd export-diff was interrupted or failed.`);
}

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new RbdDiffError(`The rbd diff stream has an impossible ${what} (${v}).`);
  return Number(v);
}

/** Metadata of a diff stream (what came before the first data record). */
export interface DiffMeta {
  version: 1 | 2;
  fromSnap: string | null;
  toSnap: string | null;
  size: number;
}

/** A data record: `data` is null for a zero record ('z'); for 'w' the bytes come through readData. */
export interface DiffExtent {
  offset: number;
  length: number;
  zero: boolean;
}

/**
 * Reads one diff stream. Call meta() once, then nextExtent() until it returns null; for a 'w' extent,
 * readData() must consume exactly its length (in pieces) before the next nextExtent().
 */
export class RbdDiffReader {
  private version: 1 | 2 = 1;
  private pendingTag: number | null = null;
  private lastEnd = 0;
  private unread = 0;
  private meta_: DiffMeta | null = null;

  constructor(
    private readonly in_: ByteReader,
    /** The size the image (snapshot) has according to `rbd info`; the stream must agree. */
    private readonly expectedSize: number,
  ) {}

  async meta(): Promise<DiffMeta> {
    const head = await this.in_.exact(HEADER_V1.length, 'the header');
    const h = head.toString('latin1');
    if (h === HEADER_V1) this.version = 1;
    else if (h === HEADER_V2) this.version = 2;
    else throw new RbdDiffError(`The stream is not an rbd diff (header ${JSON.stringify(h.replace(/[^\x20-\x7e]/g, '?'))}).`);
    let fromSnap: string | null = null;
    let toSnap: string | null = null;
    let size: number | null = null;
    for (;;) {
      const tag = String.fromCharCode((await this.in_.exact(1, 'a record tag'))[0]!);
      if (tag === 'f' || tag === 't') {
        const bodyLen = this.version === 2 ? u64(await this.in_.exact(8, 'a record length'), 0, 'record length') : null;
        const n = (await this.in_.exact(4, 'a snapshot name length')).readUInt32LE(0);
        if (n > MAX_NAME || (bodyLen !== null && bodyLen !== 4 + n)) throw new RbdDiffError(`The rbd diff stream has a malformed snapshot name record.`);
        const name = (await this.in_.exact(n, 'a snapshot name')).toString('utf8');
        if (tag === 'f') fromSnap = name;
        else toSnap = name;
      } else if (tag === 's') {
        if (this.version === 2 && u64(await this.in_.exact(8, 'a record length'), 0, 'record length') !== 8) throw new RbdDiffError('The rbd diff stream has a malformed size record.');
        size = u64(await this.in_.exact(8, 'the image size'), 0, 'image size');
      } else if (tag === 'w' || tag === 'z' || tag === 'e') {
        this.pendingTag = tag.charCodeAt(0);
        break;
      } else if (this.version === 2) {
        // v2 exists so that unknown metadata can be skipped.
        await this.in_.skip(u64(await this.in_.exact(8, 'a record length'), 0, 'record length'), 'an unknown record');
      } else {
        throw new RbdDiffError(`The rbd diff stream has an unknown record tag ${JSON.stringify(tag)}.`);
      }
    }
    if (size === null) throw new RbdDiffError('The rbd diff stream has no size record.');
    if (size !== this.expectedSize) throw new RbdDiffError(`The rbd diff stream describes an image of ${size} bytes, but the image has ${this.expectedSize}.`);
    this.meta_ = { version: this.version, fromSnap, toSnap, size };
    return this.meta_;
  }

  /** The next data extent in offset order, or null after the end record (and the end of the stream). */
  async nextExtent(): Promise<DiffExtent | null> {
    if (!this.meta_) throw new Error('meta() first');
    if (this.unread > 0) throw new Error('readData() did not consume the previous extent');
    for (;;) {
      const tagCode = this.pendingTag ?? (await this.in_.exact(1, 'a record tag'))[0]!;
      this.pendingTag = null;
      const tag = String.fromCharCode(tagCode);
      if (tag === 'e') {
        if (!(await this.in_.atEnd())) throw new RbdDiffError('The rbd diff stream has data after its end record.');
        return null;
      }
      if (tag !== 'w' && tag !== 'z') {
        if (this.version === 2 && !'fts'.includes(tag)) {
          await this.in_.skip(u64(await this.in_.exact(8, 'a record length'), 0, 'record length'), 'an unknown record');
          continue;
        }
        throw new RbdDiffError(`The rbd diff stream has an unexpected record ${JSON.stringify(tag)} among its data records.`);
      }
      const bodyLen = this.version === 2 ? u64(await this.in_.exact(8, 'a record length'), 0, 'record length') : null;
      const b = await this.in_.exact(16, 'an extent');
      const offset = u64(b, 0, 'offset');
      const length = u64(b, 8, 'length');
      if (bodyLen !== null && bodyLen !== 16 + (tag === 'w' ? length : 0)) throw new RbdDiffError(`The rbd diff stream has a record whose length does not match its extent (offset ${offset}).`);
      if (offset + length > this.meta_.size) {
        throw new RbdDiffError(`The rbd diff stream names bytes ${offset}..${offset + length} beyond the end of the ${this.meta_.size}-byte image.`);
      }
      if (offset < this.lastEnd) throw new RbdDiffError(`The rbd diff stream is out of order (an extent at ${offset} after one ending at ${this.lastEnd}).`);
      this.lastEnd = offset + length;
      if (tag === 'w') this.unread = length;
      return { offset, length, zero: tag === 'z' };
    }
  }

  /** Reads the next `n` bytes of the current 'w' extent into dst[at..]. */
  async readData(dst: Buffer, at: number, n: number): Promise<void> {
    if (n > this.unread) throw new Error('readData beyond the extent');
    if (!(await this.in_.readInto(dst, at, n))) throw truncated('a data record', this.in_.consumed);
    this.unread -= n;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Writing (restore feeds `rbd import-diff -` with a v1 stream)

export function encodeHeader(size: number): Buffer {
  const b = Buffer.alloc(HEADER_V1.length + 9);
  b.write(HEADER_V1, 0, 'latin1');
  b.write('s', HEADER_V1.length, 'latin1');
  b.writeBigUInt64LE(BigInt(size), HEADER_V1.length + 1);
  return b;
}

/** The head of a 'w' record (the data follows) or a whole 'z' record. */
export function encodeExtent(kind: 'w' | 'z', offset: number, length: number): Buffer {
  const b = Buffer.alloc(17);
  b.write(kind, 0, 'latin1');
  b.writeBigUInt64LE(BigInt(offset), 1);
  b.writeBigUInt64LE(BigInt(length), 9);
  return b;
}

export const END_RECORD = Buffer.from('e', 'latin1');
