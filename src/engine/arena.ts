import { objectRoom } from '../codec/object.js';

/** O_DIRECT wants offsets, lengths and memory aligned to the logical block size; 4096 covers 512 too. */
export const ALIGN = 4096;
const WASM_PAGE = 65536;

/** The WebAssembly global exists in Node but is not in the ES lib typings. */
const WasmMemory = (globalThis as unknown as { WebAssembly: { Memory: new (d: { initial: number; maximum: number; shared: boolean }) => { buffer: SharedArrayBuffer } } }).WebAssembly
  .Memory;

/**
 * The block pipeline's one piece of block memory, shared by the main thread and the workers: a fixed number
 * of slots, each large enough for a block or a block's object. The reader fills a slot, workers read and
 * write slots in place, and store writes and restore writes go out of slots: no block-sized allocation, copy
 * or transfer per block, so nothing for the garbage collector and a peak RSS fixed by the slot count.
 *
 * Shared WebAssembly memory because it is page-aligned (O_DIRECT reads go straight into a slot). Ownership is
 * by protocol: the main thread takes a slot, hands its number to one worker at a time, and gives it back.
 */
export class Arena {
  readonly memory: SharedArrayBuffer;
  private readonly free: number[] = [];
  private readonly waiters: ((slot: number) => void)[] = [];

  constructor(
    /** Bytes per slot: room for a block's object while it is sealed (codec/object.ts objectRoom), rounded up to ALIGN. */
    readonly slotSize: number,
    readonly slots: number,
  ) {
    this.memory = new WasmMemory({ initial: Math.ceil((slots * slotSize) / WASM_PAGE), maximum: Math.ceil((slots * slotSize) / WASM_PAGE), shared: true }).buffer;
    for (let i = slots - 1; i >= 0; i--) this.free.push(i);
  }

  static slotSizeFor(blockSize: number): number {
    return Math.ceil(objectRoom(blockSize) / ALIGN) * ALIGN;
  }

  /** A free slot, waiting for one when all are in use. */
  take(): Promise<number> {
    const s = this.free.pop();
    if (s !== undefined) return Promise.resolve(s);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  give(slot: number): void {
    const w = this.waiters.shift();
    if (w) w(slot);
    else this.free.push(slot);
  }

  /** The first `length` bytes of a slot. */
  view(slot: number, length = this.slotSize): Buffer {
    if (length > this.slotSize) throw new RangeError(`${length} bytes do not fit an arena slot of ${this.slotSize}`);
    return Buffer.from(this.memory, slot * this.slotSize, length);
  }
}

/** A view of slot `slot` of shared memory `memory` (worker side). */
export function slotView(memory: SharedArrayBuffer, slotSize: number, slot: number, length: number): Buffer {
  return Buffer.from(memory, slot * slotSize, length);
}
