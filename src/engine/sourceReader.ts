import { constants as fsc } from 'node:fs';
import * as fs from 'node:fs/promises';
import { describeSystemError, UsageError } from '../errors.js';
import type { BufferPool } from '../util/buffers.js';
import { UNLIMITED, type Throttle } from '../util/throttle.js';
import { readFully } from './device.js';

/** O_DIRECT wants offsets, lengths and memory aligned to the logical block size; 4096 covers 512 too. */
const ALIGN = 4096;
const WASM_PAGE = 65536;
/** The WebAssembly global exists in Node but is not in the ES lib typings. */
const WasmMemory = (globalThis as unknown as { WebAssembly: { Memory: new (d: { initial: number }) => { buffer: ArrayBuffer } } }).WebAssembly.Memory;

/**
 * Reads blocks of a source without flooding the page cache of the machine being backed up: O_DIRECT with
 * page-aligned memory (WebAssembly.Memory is page-aligned; Buffer memory is not). Where the source or its
 * filesystem refuses O_DIRECT (tmpfs, some FUSE and network filesystems), it falls back to buffered reads,
 * which Node cannot tell the kernel to drop (no posix_fadvise): `direct` tells which mode is in use.
 */
export class SourceReader {
  private readonly free: number[] = [];
  private readonly waiters: ((slot: number) => void)[] = [];
  private readonly arena: ArrayBuffer | null;

  private constructor(
    private fh: fs.FileHandle,
    readonly path: string,
    public direct: boolean,
    private readonly slotSize: number,
    slots: number,
    private readonly throttle: Throttle,
    private readonly buffers: BufferPool | null,
  ) {
    this.arena = direct && slots > 0 ? new WasmMemory({ initial: Math.ceil((slots * slotSize) / WASM_PAGE) }).buffer : null;
    for (let i = 0; i < slots; i++) this.free.push(i);
  }

  static async open(path: string, opts: { blockSize: number; slots: number; direct: boolean; throttle?: Throttle; buffers?: BufferPool }): Promise<SourceReader> {
    const slotSize = Math.ceil(opts.blockSize / ALIGN) * ALIGN;
    let fh: fs.FileHandle | undefined;
    let direct = opts.direct;
    if (direct) {
      try {
        fh = await fs.open(path, fsc.O_RDONLY | fsc.O_DIRECT);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw describeSystemError(err, `Source ${path}`);
        direct = false;
      }
    }
    if (!fh) {
      try {
        fh = await fs.open(path, fsc.O_RDONLY);
      } catch (err) {
        throw describeSystemError(err, `Source ${path}`);
      }
    }
    return new SourceReader(fh, path, direct, slotSize, Math.max(0, opts.slots), opts.throttle ?? UNLIMITED, opts.buffers ?? null);
  }

  private async slot(): Promise<number> {
    const s = this.free.pop();
    if (s !== undefined) return s;
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  private release(slot: number): void {
    const w = this.waiters.shift();
    if (w) w(slot);
    else this.free.push(slot);
  }

  /** Reads `length` bytes at `offset` (block-aligned) into a new buffer that owns its memory (transferable). */
  async read(offset: number, length: number): Promise<Buffer> {
    await this.throttle.take(length);
    const out = this.buffers ? this.buffers.take(length) : Buffer.allocUnsafeSlow(length);
    let got: number;
    try {
      got = this.direct ? await this.readDirect(offset, length, out) : await readFully(this.fh, out, length, offset);
    } catch (err) {
      throw describeSystemError(err, `Reading source ${this.path} at offset ${offset}`);
    }
    if (got !== length) throw new UsageError(`Source ${this.path} shrank while it was read (short read at offset ${offset + got}).`);
    return out;
  }

  /**
   * Reads `length` bytes at `offset` (block-aligned) into `slot`, a page-aligned arena slot (arena.ts) with room
   * for `length` rounded up to ALIGN: O_DIRECT reads land there without a bounce buffer.
   */
  async readInto(offset: number, length: number, slot: Buffer): Promise<void> {
    await this.throttle.take(length);
    let got: number;
    try {
      if (this.direct) {
        try {
          got = Math.min(length, await readFully(this.fh, slot, Math.ceil(length / ALIGN) * ALIGN, offset));
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
          // The filesystem accepted O_DIRECT at open but not for reads: continue buffered.
          await this.reopenBuffered();
          got = await readFully(this.fh, slot, length, offset);
        }
      } else got = await readFully(this.fh, slot, length, offset);
    } catch (err) {
      throw describeSystemError(err, `Reading source ${this.path} at offset ${offset}`);
    }
    if (got !== length) throw new UsageError(`Source ${this.path} shrank while it was read (short read at offset ${offset + got}).`);
  }

  private async readDirect(offset: number, length: number, out: Buffer): Promise<number> {
    const slot = await this.slot();
    try {
      const aligned = Math.ceil(length / ALIGN) * ALIGN;
      if (!this.arena) throw new Error('SourceReader opened without slots: use readInto');
      const view = Buffer.from(this.arena, slot * this.slotSize, aligned);
      let got: number;
      try {
        got = await readFully(this.fh, view, aligned, offset);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
        // The filesystem accepted O_DIRECT at open but not for reads: continue buffered.
        await this.reopenBuffered();
        return readFully(this.fh, out, length, offset);
      }
      view.copy(out, 0, 0, Math.min(got, length));
      return Math.min(got, length);
    } finally {
      this.release(slot);
    }
  }

  private async reopenBuffered(): Promise<void> {
    if (!this.direct) return;
    this.direct = false;
    const old = this.fh;
    this.fh = await fs.open(this.path, fsc.O_RDONLY);
    await old.close();
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
