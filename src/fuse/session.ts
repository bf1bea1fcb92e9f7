import type { FuseDevice } from './device.js';
import type { FsNode } from './node.js';
import {
  attrOut,
  DT_DIR,
  DT_LNK,
  DT_REG,
  dirent,
  entryOut,
  Errno,
  FATTR_GID,
  FATTR_MODE,
  FATTR_SIZE,
  FATTR_UID,
  FOPEN_KEEP_CACHE,
  IN_HEADER_SIZE,
  InitFlag,
  initOut,
  lseekOut,
  Op,
  openOut,
  outHeader,
  parseInHeader,
  parseInitIn,
  parseIo,
  parseLseek,
  parseOpenFlags,
  parseSetattr,
  SEEK_DATA,
  SEEK_HOLE,
  statfsOut,
  WRITE_IN_SIZE,
  writeOut,
  type Attr,
  type InHeader,
} from './protocol.js';

/** Largest read or write the kernel sends: 256 pages (1 MiB), fewer round trips for sequential reads. */
export const MAX_IO = 1 << 20;
const MAX_PAGES = MAX_IO / 4096;
/** Reads and writes the kernel keeps in flight at once (its default is 12). */
const MAX_BACKGROUND = 32;
/** Names and attributes never change while mounted: let the kernel cache them long. */
const VALID_SECONDS = 3600;
const O_ACCMODE = 3;
const O_RDONLY = 0;

/** An error a handler raises to answer with an errno. */
class Reply extends Error {
  constructor(readonly errno: number) {
    super(`errno ${errno}`);
  }
}

/**
 * One FUSE connection serving a fixed tree: decodes requests, answers them from the tree, and reports read
 * and write failures (a damaged block) as EIO for that request only, with one log line.
 */
export class FuseSession {
  private readonly ended: Promise<string>;
  private resolveEnded: (code: string) => void = () => undefined;
  readonly errors: string[] = [];
  /** Resolves once INIT is answered (settings of the mount made before that are reset by INIT). */
  readonly initialized: Promise<void>;
  private resolveInit: () => void = () => undefined;

  constructor(
    private readonly dev: FuseDevice,
    private readonly nodes: ReadonlyMap<number, FsNode>,
    private readonly log: (m: string) => void,
  ) {
    this.ended = new Promise((r) => (this.resolveEnded = r));
    this.initialized = new Promise((r) => (this.resolveInit = r));
  }

  /** Starts serving; resolves with the reason the connection ended (normally ENODEV after unmount). */
  serve(): Promise<string> {
    this.dev.start(MAX_IO + 64 * 1024, {
      request: (b) => this.handle(b),
      end: (code) => this.resolveEnded(code),
    });
    return this.ended;
  }

  private handle(b: Buffer): void {
    const h = parseInHeader(b);
    const body = b.subarray(IN_HEADER_SIZE, h.len);
    let result: Buffer | Buffer[] | null | Promise<Buffer | Buffer[]>;
    try {
      result = this.dispatch(h, body);
    } catch (err) {
      this.fail(h, err);
      return;
    }
    if (result === null) return; // no reply for FORGET, INTERRUPT
    if (result instanceof Promise) {
      result.then(
        (r) => this.send(h, r),
        (err: unknown) => this.fail(h, err),
      );
    } else this.send(h, result);
  }

  private send(h: InHeader, r: Buffer | Buffer[]): void {
    const parts = Array.isArray(r) ? r : [r];
    const len = parts.reduce((n, p) => n + p.length, 0);
    this.dev.reply([outHeader(h.unique, 0, len), ...parts]);
    if (h.opcode === Op.INIT) this.resolveInit();
  }

  private fail(h: InHeader, err: unknown): void {
    let errno: number = Errno.EIO;
    if (err instanceof Reply) errno = err.errno;
    else {
      const m = `${opName(h.opcode)} failed: ${(err as Error)?.message ?? String(err)}`;
      this.errors.push(m);
      this.log(`${m} (answered EIO)`);
    }
    this.dev.reply([outHeader(h.unique, errno, 0)]);
  }

  private node(ino: number): FsNode {
    const n = this.nodes.get(ino);
    if (!n) throw new Reply(Errno.ENOENT);
    return n;
  }

  private dispatch(h: InHeader, body: Buffer): Buffer | Buffer[] | null | Promise<Buffer | Buffer[]> {
    switch (h.opcode) {
      case Op.INIT: {
        const init = parseInitIn(body);
        if (init.major !== 7) throw new Reply(Errno.EPROTO);
        const want = InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.PARALLEL_DIROPS | InitFlag.MAX_PAGES;
        return initOut({ maxReadahead: init.maxReadahead, flags: init.flags & want, maxBackground: MAX_BACKGROUND, maxWrite: MAX_IO, maxPages: MAX_PAGES });
      }
      case Op.DESTROY:
        return Buffer.alloc(0);
      case Op.FORGET:
      case Op.BATCH_FORGET:
      case Op.INTERRUPT:
        // The tree is fixed (nothing to forget); requests finish quickly, so interrupts are left to complete.
        return null;
      case Op.LOOKUP: {
        const dir = this.node(h.nodeid);
        if (dir.kind !== 'dir') throw new Reply(Errno.ENOENT);
        const name = body.subarray(0, body.indexOf(0) < 0 ? body.length : body.indexOf(0)).toString();
        const child = dir.children.get(name);
        if (!child) throw new Reply(Errno.ENOENT);
        return entryOut(attrOf(child), VALID_SECONDS);
      }
      case Op.GETATTR:
        return attrOut(attrOf(this.node(h.nodeid)), VALID_SECONDS);
      case Op.SETATTR: {
        const n = this.node(h.nodeid);
        const s = parseSetattr(body);
        // Sizes are fixed (a disk image), owners and modes too; time updates (touch) are accepted and ignored.
        if (s.valid & FATTR_SIZE && !(n.kind === 'data' && s.size === n.source.size)) throw new Reply(Errno.EPERM);
        if (s.valid & (FATTR_MODE | FATTR_UID | FATTR_GID)) throw new Reply(Errno.EPERM);
        return attrOut(attrOf(n), VALID_SECONDS);
      }
      case Op.READLINK: {
        const n = this.node(h.nodeid);
        if (n.kind !== 'link') throw new Reply(Errno.EINVAL);
        return Buffer.from(n.target);
      }
      case Op.OPENDIR:
        if (this.node(h.nodeid).kind !== 'dir') throw new Reply(Errno.ENOTDIR);
        return openOut(0, 0);
      case Op.RELEASEDIR:
      case Op.RELEASE:
      case Op.FLUSH:
      case Op.FSYNCDIR:
        return Buffer.alloc(0);
      case Op.READDIR:
        return this.readdir(h.nodeid, parseIo(body));
      case Op.OPEN: {
        const n = this.node(h.nodeid);
        const flags = parseOpenFlags(body);
        if ((flags & O_ACCMODE) !== O_RDONLY && !(n.kind === 'data' && n.source.writable)) throw new Reply(Errno.EROFS);
        // Contents of a read-only mount never change: keep the page cache across opens.
        return openOut(0, n.kind === 'data' && n.source.writable ? 0 : FOPEN_KEEP_CACHE);
      }
      case Op.READ:
        return this.read(this.node(h.nodeid), parseIo(body));
      case Op.WRITE: {
        const n = this.node(h.nodeid);
        if (n.kind !== 'data' || !n.source.writable) throw new Reply(Errno.EROFS);
        const io = parseIo(body);
        if (io.offset + io.size > n.source.size) throw new Reply(Errno.ENOSPC);
        const data = body.subarray(WRITE_IN_SIZE, WRITE_IN_SIZE + io.size);
        return n.source.write(io.offset, Buffer.from(data)).then(() => writeOut(io.size));
      }
      case Op.FSYNC: {
        const n = this.node(h.nodeid);
        return n.kind === 'data' ? n.source.flush().then(() => Buffer.alloc(0)) : Buffer.alloc(0);
      }
      case Op.LSEEK:
        return this.lseek(this.node(h.nodeid), parseLseek(body));
      case Op.STATFS: {
        let bytes = 0;
        for (const n of this.nodes.values()) if (n.kind === 'data') bytes += n.source.size;
        return statfsOut({ blocks: Math.ceil(bytes / 4096), files: this.nodes.size });
      }
      default:
        // GETXATTR, LISTXATTR, ACCESS, …: ENOSYS tells the kernel not to ask again.
        throw new Reply(Errno.ENOSYS);
    }
  }

  private readdir(ino: number, io: { offset: number; size: number }): Buffer[] {
    const dir = this.node(ino);
    if (dir.kind !== 'dir') throw new Reply(Errno.ENOTDIR);
    const entries: [string, number, number][] = [
      ['.', dir.ino, DT_DIR],
      ['..', dir.parent, DT_DIR],
      ...[...dir.children].map(([name, n]): [string, number, number] => [name, n.ino, n.kind === 'dir' ? DT_DIR : n.kind === 'link' ? DT_LNK : DT_REG]),
    ];
    const out: Buffer[] = [];
    let used = 0;
    for (let i = io.offset; i < entries.length; i++) {
      const [name, eino, type] = entries[i]!;
      const d = dirent(eino, i + 1, type, name);
      if (used + d.length > io.size) break;
      out.push(d);
      used += d.length;
    }
    return out;
  }

  private read(n: FsNode, io: { offset: number; size: number }): Buffer | Promise<Buffer> {
    if (n.kind === 'file') return n.content.subarray(Math.min(io.offset, n.content.length), Math.min(io.offset + io.size, n.content.length));
    if (n.kind !== 'data') throw new Reply(Errno.EISDIR);
    const end = Math.min(n.source.size, io.offset + io.size);
    if (end <= io.offset) return Buffer.alloc(0);
    return n.source.read(io.offset, end - io.offset);
  }

  private lseek(n: FsNode, s: { offset: number; whence: number }): Buffer {
    if (s.whence !== SEEK_DATA && s.whence !== SEEK_HOLE) throw new Reply(Errno.EINVAL);
    const size = n.kind === 'data' ? n.source.size : n.kind === 'file' ? n.content.length : 0;
    if (s.offset >= size) throw new Reply(Errno.ENXIO);
    if (n.kind !== 'data') return lseekOut(s.whence === SEEK_DATA ? s.offset : size);
    const found = n.source.seek(s.offset, s.whence === SEEK_HOLE);
    if (found === null) {
      if (s.whence === SEEK_DATA) throw new Reply(Errno.ENXIO);
      return lseekOut(size); // the end of a file counts as a hole
    }
    return lseekOut(found);
  }
}

function attrOf(n: FsNode): Attr {
  switch (n.kind) {
    case 'dir':
      return { ino: n.ino, size: 0, blocks: 0, time: n.time, mode: 0o40555, nlink: 2 + [...n.children.values()].filter((c) => c.kind === 'dir').length };
    case 'file':
      return { ino: n.ino, size: n.content.length, blocks: Math.ceil(n.content.length / 512), time: n.time, mode: 0o100444, nlink: 1 };
    case 'data':
      return { ino: n.ino, size: n.source.size, blocks: Math.ceil(n.source.allocated / 512), time: n.time, mode: n.source.writable ? 0o100644 : 0o100444, nlink: 1 };
    case 'link':
      return { ino: n.ino, size: Buffer.byteLength(n.target), blocks: 0, time: n.time, mode: 0o120777, nlink: 1 };
  }
}

function opName(op: number): string {
  return Object.entries(Op).find(([, v]) => v === op)?.[0] ?? `opcode ${op}`;
}
