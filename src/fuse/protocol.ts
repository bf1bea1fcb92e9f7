/**
 * The parts of the Linux FUSE kernel protocol (linux/fuse.h, protocol 7.x) blocksafe speaks over /dev/fuse:
 * request header parsing and the reply structures, as little-endian byte layouts. Everything here is pure
 * encoding; the device and the dispatch live in device.ts and session.ts.
 */

export const FUSE_KERNEL_VERSION = 7;
/** The minor version we answer with; the kernel adapts to the smaller of its own and ours. */
export const FUSE_KERNEL_MINOR_VERSION = 31;
export const FUSE_ROOT_ID = 1;

export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  GETXATTR: 22,
  LISTXATTR: 23,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  LSEEK: 46,
} as const;

/** INIT flags we use. */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
} as const;

export const FOPEN_KEEP_CACHE = 1 << 1;

/** Errno values (positive; replies carry them negated). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  ENXIO: 6,
  EACCES: 13,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENOSPC: 28,
  EROFS: 30,
  ENOSYS: 38,
  ENODATA: 61,
  EPROTO: 71,
} as const;

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;

export interface InHeader {
  len: number;
  opcode: number;
  unique: bigint;
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
}

export function parseInHeader(b: Buffer): InHeader {
  return {
    len: b.readUInt32LE(0),
    opcode: b.readUInt32LE(4),
    unique: b.readBigUInt64LE(8),
    nodeid: Number(b.readBigUInt64LE(16)),
    uid: b.readUInt32LE(24),
    gid: b.readUInt32LE(28),
    pid: b.readUInt32LE(32),
  };
}

export function outHeader(unique: bigint, error: number, bodyLength: number): Buffer {
  const h = Buffer.alloc(OUT_HEADER_SIZE);
  h.writeUInt32LE(OUT_HEADER_SIZE + bodyLength, 0);
  h.writeInt32LE(error === 0 ? 0 : -error, 4);
  h.writeBigUInt64LE(unique, 8);
  return h;
}

export interface Attr {
  ino: number;
  size: number;
  /** 512-byte units allocated. */
  blocks: number;
  /** Seconds since the epoch (atime, mtime and ctime alike). */
  time: number;
  mode: number;
  nlink: number;
}

export const ATTR_SIZE = 88;

function writeAttr(b: Buffer, at: number, a: Attr): void {
  b.writeBigUInt64LE(BigInt(a.ino), at);
  b.writeBigUInt64LE(BigInt(a.size), at + 8);
  b.writeBigUInt64LE(BigInt(a.blocks), at + 16);
  for (const o of [24, 32, 40]) b.writeBigUInt64LE(BigInt(Math.max(0, Math.floor(a.time))), at + o);
  // atimensec, mtimensec, ctimensec stay 0
  b.writeUInt32LE(a.mode, at + 60);
  b.writeUInt32LE(a.nlink, at + 64);
  // uid, gid = 0 (root), rdev = 0
  b.writeUInt32LE(4096, at + 80); // blksize
}

/** fuse_entry_out: the answer to LOOKUP. `validSeconds` lets the kernel cache name and attributes. */
export function entryOut(a: Attr, validSeconds: number): Buffer {
  const b = Buffer.alloc(40 + ATTR_SIZE);
  b.writeBigUInt64LE(BigInt(a.ino), 0);
  b.writeBigUInt64LE(BigInt(validSeconds), 16);
  b.writeBigUInt64LE(BigInt(validSeconds), 24);
  writeAttr(b, 40, a);
  return b;
}

/** fuse_attr_out: the answer to GETATTR and SETATTR. */
export function attrOut(a: Attr, validSeconds: number): Buffer {
  const b = Buffer.alloc(16 + ATTR_SIZE);
  b.writeBigUInt64LE(BigInt(validSeconds), 0);
  writeAttr(b, 16, a);
  return b;
}

export interface InitIn {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
}

export function parseInitIn(body: Buffer): InitIn {
  return { major: body.readUInt32LE(0), minor: body.readUInt32LE(4), maxReadahead: body.readUInt32LE(8), flags: body.readUInt32LE(12) };
}

export function initOut(o: { maxReadahead: number; flags: number; maxBackground: number; maxWrite: number; maxPages: number }): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
  b.writeUInt32LE(FUSE_KERNEL_MINOR_VERSION, 4);
  b.writeUInt32LE(o.maxReadahead, 8);
  b.writeUInt32LE(o.flags, 12);
  b.writeUInt16LE(o.maxBackground, 16);
  b.writeUInt16LE(Math.floor((o.maxBackground * 3) / 4), 18); // congestion threshold, as libfuse
  b.writeUInt32LE(o.maxWrite, 20);
  b.writeUInt32LE(1, 24); // time granularity: 1 ns
  b.writeUInt16LE(o.maxPages, 28);
  return b;
}

export function openOut(fh: number, flags: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(BigInt(fh), 0);
  b.writeUInt32LE(flags, 8);
  return b;
}

export function writeOut(size: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(size, 0);
  return b;
}

export function lseekOut(offset: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(offset), 0);
  return b;
}

export function statfsOut(o: { blocks: number; files: number }): Buffer {
  const b = Buffer.alloc(80);
  b.writeBigUInt64LE(BigInt(o.blocks), 0);
  b.writeBigUInt64LE(BigInt(o.files), 24);
  b.writeUInt32LE(4096, 40); // bsize
  b.writeUInt32LE(255, 44); // namelen
  b.writeUInt32LE(4096, 48); // frsize
  return b;
}

/** fuse_read_in / fuse_write_in share their first fields: fh, offset, size. */
export function parseIo(body: Buffer): { fh: number; offset: number; size: number; writeFlags: number } {
  return { fh: Number(body.readBigUInt64LE(0)), offset: Number(body.readBigUInt64LE(8)), size: body.readUInt32LE(16), writeFlags: body.readUInt32LE(20) };
}

/** Size of fuse_write_in, after which the written bytes follow. */
export const WRITE_IN_SIZE = 40;

export function parseLseek(body: Buffer): { offset: number; whence: number } {
  return { offset: Number(body.readBigUInt64LE(8)), whence: body.readUInt32LE(16) };
}

export function parseOpenFlags(body: Buffer): number {
  return body.readUInt32LE(0);
}

/** fuse_setattr_in: which attributes (FATTR_* bits) and the new size. */
export function parseSetattr(body: Buffer): { valid: number; size: number } {
  return { valid: body.readUInt32LE(0), size: Number(body.readBigUInt64LE(16)) };
}
export const FATTR_SIZE = 1 << 3;
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;

/** DT_* directory entry types. */
export const DT_DIR = 4;
export const DT_REG = 8;
export const DT_LNK = 10;

/** One fuse_dirent record (8-byte aligned); `next` is the offset the kernel passes to continue after it. */
export function dirent(ino: number, next: number, type: number, name: string): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc((24 + n.length + 7) & ~7);
  b.writeBigUInt64LE(BigInt(ino), 0);
  b.writeBigUInt64LE(BigInt(next), 8);
  b.writeUInt32LE(n.length, 16);
  b.writeUInt32LE(type, 20);
  n.copy(b, 24);
  return b;
}
