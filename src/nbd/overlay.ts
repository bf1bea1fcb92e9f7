import { randomBytes } from 'node:crypto';
import { unlinkSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { describeSystemError } from '../errors.js';
import { readFully, writeFully } from '../engine/device.js';

/** Granularity of the overlay: writes are tracked (and read-modify-written at the edges) in 4 KiB units. */
export const GRANULE = 4096;
/** Granules per region of the state map; a region exists only once something in it was written. */
const REGION_GRANULES = 1024; // 4 MiB of volume per region
const REGION_BYTES = REGION_GRANULES / 4; // 2 bits per granule

/**
 * What a granule of the export reads as: Backing = unchanged, read from the backup; Data = written, read
 * from the overlay file; Zero = zeroed by WRITE_ZEROES or TRIM, reads as zeros with nothing stored.
 */
export const GranuleState = { Backing: 0, Data: 1, Zero: 2 } as const;
export type GranuleState = (typeof GranuleState)[keyof typeof GranuleState];

export interface OverlayRun {
  offset: number;
  length: number;
  state: GranuleState;
}

/**
 * The copy-on-write overlay of one served version: a sparse file as large as the version, holding the
 * written granules at their own offsets, plus a state map with 2 bits per 4 KiB granule (backing / data /
 * zero). The map is kept in memory in 4 MiB regions allocated on first write (256 bytes each, so 64 KiB of
 * memory per GiB written; nothing for untouched parts of the volume). The file lives in a temporary
 * directory and is removed when the server stops; the backup itself is never written.
 */
export class Overlay {
  private readonly regions = new Map<number, Uint8Array>();
  private removed = false;

  private constructor(
    readonly file: string,
    private readonly fh: fs.FileHandle,
    readonly size: number,
  ) {}

  static async create(dir: string, label: string, size: number): Promise<Overlay> {
    const file = path.join(dir, `blocksafe-nbd-${label}-${process.pid}-${randomBytes(4).toString('hex')}.overlay`);
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(file, 'wx+', 0o600);
      await fh.truncate(size);
    } catch (err) {
      throw describeSystemError(err, `Overlay file ${file}`);
    }
    return new Overlay(file, fh, size);
  }

  get granules(): number {
    return Math.ceil(this.size / GRANULE);
  }

  /** Number of granules that are not Backing (for reports). */
  changedGranules(): number {
    let n = 0;
    for (const r of this.regions.values()) for (const b of r) for (let s = 0; s < 8; s += 2) if ((b >> s) & 3) n++;
    return n;
  }

  state(g: number): GranuleState {
    const r = this.regions.get(Math.floor(g / REGION_GRANULES));
    if (!r) return GranuleState.Backing;
    const i = g % REGION_GRANULES;
    return ((r[i >> 2]! >> ((i & 3) * 2)) & 3) as GranuleState;
  }

  /** Sets granules [first, last] to `state`. */
  setState(first: number, last: number, state: GranuleState): void {
    for (let g = first; g <= last; g++) {
      const rn = Math.floor(g / REGION_GRANULES);
      let r = this.regions.get(rn);
      if (!r) {
        if (state === GranuleState.Backing) continue;
        r = new Uint8Array(REGION_BYTES);
        this.regions.set(rn, r);
      }
      const i = g % REGION_GRANULES;
      const shift = (i & 3) * 2;
      r[i >> 2] = (r[i >> 2]! & ~(3 << shift)) | (state << shift);
    }
  }

  /** True when some granule overlapping [offset, offset+length) is not Backing. */
  touches(offset: number, length: number): boolean {
    if (length <= 0) return false;
    const first = Math.floor(offset / GRANULE);
    const last = Math.floor((offset + length - 1) / GRANULE);
    for (let g = first; g <= last;) {
      const rn = Math.floor(g / REGION_GRANULES);
      if (!this.regions.has(rn)) {
        g = (rn + 1) * REGION_GRANULES;
        continue;
      }
      if (this.state(g) !== GranuleState.Backing) return true;
      g++;
    }
    return false;
  }

  /** [offset, offset+length) cut into maximal runs of one state (clipped to the range). */
  runs(offset: number, length: number): OverlayRun[] {
    const out: OverlayRun[] = [];
    const end = offset + length;
    const push = (from: number, to: number, state: GranuleState) => {
      const a = Math.max(from, offset);
      const b = Math.min(to, end);
      if (b <= a) return;
      const last = out[out.length - 1];
      if (last && last.state === state && last.offset + last.length === a) last.length += b - a;
      else out.push({ offset: a, length: b - a, state });
    };
    if (length <= 0) return out;
    const first = Math.floor(offset / GRANULE);
    const lastG = Math.floor((end - 1) / GRANULE);
    for (let g = first; g <= lastG;) {
      const rn = Math.floor(g / REGION_GRANULES);
      if (!this.regions.has(rn)) {
        const next = Math.min((rn + 1) * REGION_GRANULES, lastG + 1);
        push(g * GRANULE, next * GRANULE, GranuleState.Backing);
        g = next;
        continue;
      }
      push(g * GRANULE, (g + 1) * GRANULE, this.state(g));
      g++;
    }
    return out;
  }

  /** Reads `length` bytes of the overlay file at `offset` into buf[at…]. */
  async read(buf: Buffer, at: number, offset: number, length: number): Promise<void> {
    const n = await readFully(this.fh, buf.subarray(at, at + length), length, offset);
    if (n < length) buf.fill(0, at + n, at + length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await writeFully(this.fh, data, offset);
  }

  async sync(): Promise<void> {
    await this.fh.datasync();
  }

  /** Closes and deletes the overlay file. */
  async remove(): Promise<void> {
    if (this.removed) return;
    this.removed = true;
    await this.fh.close().catch(() => undefined);
    await fs.unlink(this.file).catch(() => undefined);
  }

  /** For a hurried exit (second Ctrl-C): delete the file synchronously. */
  removeSync(): void {
    if (this.removed) return;
    this.removed = true;
    try {
      unlinkSync(this.file);
    } catch {
      // already gone
    }
  }
}
