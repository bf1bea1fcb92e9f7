import { BlockMapChunk, CHUNK_BLOCKS } from '../index/blockmap.js';
import type { VersionRecord } from '../index/records.js';
import type { Repository } from '../engine/repository.js';
import type { BlockCache } from './blockCache.js';
import { GRANULE, GranuleState, type Overlay } from './overlay.js';
import { STATE_HOLE, STATE_ZERO } from './protocol.js';

export interface Extent {
  length: number;
  /** base:allocation flags: 0 (data) or HOLE|ZERO. */
  flags: number;
}

const ZERO_FLAGS = STATE_HOLE | STATE_ZERO;
/** Map chunks (1024 block entries each) kept per export, so interleaved clients do not re-read the index. */
const MAP_CHUNKS_CACHED = 4;

/**
 * One served version: reads merge the backup (blocks fetched on demand through the shared cache, sparse
 * blocks read as zeros without any I/O) and, with --rw, the copy-on-write overlay. Writes, trims and zeroing
 * go to the overlay only; they are serialized per export so edge granules are read-modify-written safely.
 */
export class NbdExport {
  private readonly chunks = new Map<number, BlockMapChunk | null>();
  private writeChain: Promise<unknown> = Promise.resolve();

  constructor(
    readonly version: VersionRecord,
    private readonly repo: Repository,
    private readonly cache: BlockCache,
    readonly overlay: Overlay | null,
  ) {}

  get size(): number {
    return this.version.size;
  }
  get blockSize(): number {
    return this.version.block_size;
  }
  get readOnly(): boolean {
    return this.overlay === null;
  }

  /** Checksum of backup block i, or null when it is sparse. */
  checksum(i: number): Buffer | null {
    const c = Math.floor(i / CHUNK_BLOCKS);
    let chunk = this.chunks.get(c);
    if (chunk === undefined) {
      chunk = this.repo.index.getChunk(this.version.id, c) ?? null;
      this.chunks.set(c, chunk);
      while (this.chunks.size > MAP_CHUNKS_CACHED) this.chunks.delete(this.chunks.keys().next().value as number);
    } else {
      this.chunks.delete(c);
      this.chunks.set(c, chunk);
    }
    return chunk ? chunk.get(i % CHUNK_BLOCKS) : null;
  }

  private blockLength(i: number): number {
    return Math.min(this.blockSize, this.size - i * this.blockSize);
  }

  /** The content of [offset, offset+length), which must lie inside the export. */
  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    const runs = this.overlay ? this.overlay.runs(offset, length) : [{ offset, length, state: GranuleState.Backing }];
    await Promise.all(
      runs.map((r) => {
        if (r.state === GranuleState.Data) return this.overlay!.read(buf, r.offset - offset, r.offset, r.length);
        if (r.state === GranuleState.Backing) return this.readBacking(buf, r.offset - offset, r.offset, r.length);
        return Promise.resolve(); // Zero: already zeros
      }),
    );
    return buf;
  }

  /**
   * Starts loading the backup blocks of [offset, offset+length) into the shared cache without waiting (a
   * sequential reader's next blocks: decoding overlaps with the reader consuming the current one). Failures
   * are not reported here; the read that needs the block meets them.
   */
  prefetch(offset: number, length: number): void {
    const bs = this.blockSize;
    const end = Math.min(this.size, offset + length);
    for (let i = Math.floor(offset / bs); i * bs < end; i++) {
      if (this.overlay && !this.overlay.runs(i * bs, this.blockLength(i)).some((r) => r.state === GranuleState.Backing)) continue;
      const checksum = this.checksum(i);
      if (checksum) this.cache.get(checksum, this.blockLength(i)).catch(() => undefined);
    }
  }

  /** Backup content of [offset, offset+length) into buf[at…]; sparse blocks stay zero. */
  private async readBacking(buf: Buffer, at: number, offset: number, length: number): Promise<void> {
    const bs = this.blockSize;
    const end = offset + length;
    const loads: Promise<void>[] = [];
    for (let i = Math.floor(offset / bs); i * bs < end; i++) {
      const checksum = this.checksum(i);
      if (!checksum) continue;
      const from = Math.max(offset, i * bs);
      const to = Math.min(end, (i + 1) * bs);
      loads.push(
        this.cache.get(checksum, this.blockLength(i)).then((block) => {
          block.copy(buf, at + (from - offset), from - i * bs, to - i * bs);
        }),
      );
    }
    await Promise.all(loads);
  }

  /**
   * Allocation status of [offset, offset+length) as merged extents: backup sparse blocks and zeroed overlay
   * granules are HOLE|ZERO, everything else data. At most `max` extents (the last may end early: clients ask
   * again for the rest).
   */
  extents(offset: number, length: number, max = Infinity): Extent[] {
    const out: Extent[] = [];
    const push = (len: number, flags: number): boolean => {
      if (len <= 0) return true;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += len;
      else {
        if (out.length >= max) return false;
        out.push({ length: len, flags });
      }
      return true;
    };
    const runs = this.overlay ? this.overlay.runs(offset, length) : [{ offset, length, state: GranuleState.Backing }];
    const bs = this.blockSize;
    for (const r of runs) {
      if (r.state === GranuleState.Data) {
        if (!push(r.length, 0)) break;
      } else if (r.state === GranuleState.Zero) {
        if (!push(r.length, ZERO_FLAGS)) break;
      } else {
        const end = r.offset + r.length;
        let more = true;
        for (let i = Math.floor(r.offset / bs); i * bs < end && more; i++) {
          const from = Math.max(r.offset, i * bs);
          const to = Math.min(end, (i + 1) * bs);
          more = push(to - from, this.checksum(i) ? 0 : ZERO_FLAGS);
        }
        if (!more) break;
      }
    }
    return out;
  }

  /** Writes `data` at `offset` into the overlay (the caller checked the range and that the export is writable). */
  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.serialized(async () => {
      await this.writeLocked(offset, data);
      if (fua) await this.overlay!.sync();
    });
  }

  /** Zeroes [offset, offset+length): whole granules are marked Zero, partial edge granules written with zeros. */
  zero(offset: number, length: number, fua: boolean): Promise<void> {
    return this.serialized(async () => {
      const ov = this.overlay!;
      const end = offset + length;
      // Granules entirely inside the range (the last granule of the export may be short).
      const firstFull = Math.ceil(offset / GRANULE);
      const lastFull = end >= this.size ? Math.ceil(this.size / GRANULE) - 1 : Math.floor(end / GRANULE) - 1;
      if (lastFull < firstFull) {
        await this.writeLocked(offset, Buffer.alloc(length));
      } else {
        const headEnd = firstFull * GRANULE;
        if (headEnd > offset) await this.writeLocked(offset, Buffer.alloc(headEnd - offset));
        const tailStart = Math.min(this.size, (lastFull + 1) * GRANULE);
        if (end > tailStart) await this.writeLocked(tailStart, Buffer.alloc(end - tailStart));
        ov.setState(firstFull, lastFull, GranuleState.Zero);
      }
      if (fua) await ov.sync();
    });
  }

  async flush(): Promise<void> {
    if (this.overlay) await this.serialized(() => this.overlay!.sync());
  }

  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.writeChain.then(fn, fn);
    this.writeChain = run.catch(() => undefined);
    return run;
  }

  /**
   * The write proper: widened to whole granules, with the parts of edge granules the write does not cover
   * taken from the current content (backup, overlay or zeros); the file is written before the state map
   * says Data, so a concurrent reader sees either the old or the new content.
   */
  private async writeLocked(offset: number, data: Buffer): Promise<void> {
    const ov = this.overlay!;
    const end = offset + data.length;
    const first = Math.floor(offset / GRANULE);
    const last = Math.floor((end - 1) / GRANULE);
    const alignedStart = first * GRANULE;
    const alignedEnd = Math.min(this.size, (last + 1) * GRANULE);
    let out = data;
    if (alignedStart !== offset || alignedEnd !== end) {
      out = Buffer.alloc(alignedEnd - alignedStart);
      if (alignedStart < offset) (await this.read(alignedStart, Math.min(GRANULE, alignedEnd - alignedStart))).copy(out, 0);
      const tailStart = last * GRANULE;
      if (alignedEnd > end && (tailStart > alignedStart || alignedStart === offset)) {
        (await this.read(tailStart, alignedEnd - tailStart)).copy(out, tailStart - alignedStart);
      }
      data.copy(out, offset - alignedStart);
    }
    await ov.write(alignedStart, out);
    ov.setState(first, last, GranuleState.Data);
  }
}
