import { CHECKSUM_BYTES } from '../codec/checksum.js';

/**
 * A version's block map is stored in chunks of CHUNK_BLOCKS entries, each entry the 32-byte checksum of
 * the block, all-zero meaning sparse. A 1 TiB volume of 4 MiB blocks is 256 chunks of 32 KiB — a few MiB
 * of LMDB per version, and a chunk is the unit in which a running backup commits its progress.
 */
export const CHUNK_BLOCKS = 1024;
export const SPARSE = Buffer.alloc(CHECKSUM_BYTES);

export class BlockMapChunk {
  constructor(readonly buf: Buffer) {}

  static empty(entries = CHUNK_BLOCKS): BlockMapChunk {
    return new BlockMapChunk(Buffer.alloc(entries * CHECKSUM_BYTES));
  }

  get entries(): number {
    return this.buf.length / CHECKSUM_BYTES;
  }

  /** The checksum at `i`, or null for a sparse block. */
  get(i: number): Buffer | null {
    const c = this.buf.subarray(i * CHECKSUM_BYTES, (i + 1) * CHECKSUM_BYTES);
    return c.equals(SPARSE) ? null : c;
  }

  set(i: number, checksum: Uint8Array | null): void {
    if (checksum) this.buf.set(checksum, i * CHECKSUM_BYTES);
    else this.buf.fill(0, i * CHECKSUM_BYTES, (i + 1) * CHECKSUM_BYTES);
  }
}

export function chunkCount(blocks: number): number {
  return Math.ceil(blocks / CHUNK_BLOCKS);
}

/** Reads a version's block map in volume order, one chunk in memory at a time. */
export class BlockMapCursor {
  private chunk: BlockMapChunk | undefined;
  private chunkNo = -1;

  constructor(private readonly load: (chunkNo: number) => BlockMapChunk | undefined) {}

  /** Checksum of block `i`, or null when it is sparse (an absent chunk is all sparse). */
  get(i: number): Buffer | null {
    const c = Math.floor(i / CHUNK_BLOCKS);
    if (c !== this.chunkNo) {
      this.chunk = this.load(c);
      this.chunkNo = c;
    }
    const entry = this.chunk?.get(i % CHUNK_BLOCKS) ?? null;
    return entry ? Buffer.from(entry) : null;
  }
}
