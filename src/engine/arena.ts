import { OBJECT_HEADROOM } from '../codec/object.js';

/** O_DIRECT wants offsets, lengths and memory aligned to the logical block size; 4096 covers 512 too. */
export const ALIGN = 4096;
const WASM_PAGE = 65536;
/**
 * Where a block starts in its slot: aligned for O_DIRECT, with room in front for the object's header, so a
 * block is sealed in place (codec/object.ts encodeBlockInPlace) and written to the store from its own slot.
 */
export const BLOCK_AT = ALIGN;
if (BLOCK_AT < OBJECT_HEADROOM) throw new Error('arena headroom is smaller than an object header');

/** The WebAssembly global exists in Node but is not in the ES lib typings. */
const WasmMemory = (globalThis as unknown as { WebAssembly: { Memory: new (d: { initial: number; maximum: number; shared: boolean }) => { buffer: SharedArrayBuffer } } }).WebAssembly.Memory;

/**
 * The block pipeline's one piece of block memory, shared by the main thread and the workers: a fixed number
 * of slots, each large enough for a block or a block's object. The reader fills a slot, workers hash and seal
 * it in place, objects go to the store from there; restore reads an object into one slot and a worker opens
 * it into another, which the target is written from: no block-sized allocation, copy
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
    /** Bytes per slot: headroom, the block rounded up to ALIGN, and room behind it for the object's tag. */
    readonly slotSize: number,
    readonly slots: number,
  ) {
    this.memory = new WasmMemory({ initial: Math.ceil((slots * slotSize) / WASM_PAGE), maximum: Math.ceil((slots * slotSize) / WASM_PAGE), shared: true }).buffer;
    for (let i = slots - 1; i >= 0; i--) this.free.push(i);
  }

  static slotSizeFor(blockSize: number): number {
    return BLOCK_AT + Math.ceil((blockSize + ALIGN) / ALIGN) * ALIGN;
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

  /** A slot from BLOCK_AT to its end: where the reader puts a block. */
  blockRegion(slot: number): Buffer {
    return Buffer.from(this.memory, slot * this.slotSize + BLOCK_AT, this.slotSize - BLOCK_AT);
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
