import { readFileSync } from 'node:fs';
import { describeSystemError, UsageError } from '../errors.js';

/** A changed extent of a volume (rbd-diff style hint). `exists: false` means the range is now zeros. */
export interface Extent {
  offset: number;
  length: number;
  exists: boolean;
}

/**
 * Parses an rbd-diff style hints file: a JSON array of {"offset": n, "length": n, "exists": "true"|"false"}
 * (booleans accepted too). Anything else — truncated JSON, negative numbers, a missing field — is refused
 * with the reason, because trusting a broken hints file would silently skip changed blocks.
 */
export function parseHints(text: string, where: string): Extent[] {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`Hints file ${where} is not valid JSON (${(err as Error).message}); is it truncated?`);
  }
  if (!Array.isArray(raw)) throw new UsageError(`Hints file ${where} must hold a JSON array of {offset, length, exists} entries.`);
  return raw.map((e: unknown, i) => {
    const o = e as Record<string, unknown>;
    const bad = (why: string) => new UsageError(`Hints file ${where}, entry ${i}: ${why}.`);
    if (typeof o !== 'object' || o === null) throw bad('not an object');
    const offset = o.offset;
    const length = o.length;
    if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) throw bad('"offset" must be a non-negative integer');
    if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0) throw bad('"length" must be a non-negative integer');
    const ex = o.exists;
    let exists: boolean;
    if (ex === true || ex === 'true') exists = true;
    else if (ex === false || ex === 'false') exists = false;
    else throw bad('"exists" must be "true" or "false"');
    return { offset, length, exists };
  });
}

export function readHintsFile(file: string): Extent[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw describeSystemError(err, `Hints file ${file}`);
  }
  return parseHints(text, file);
}

/** What the hints say about each block: 'read' (changed data), 'zero' (discarded), or untouched (absent). */
export type BlockHint = 'read' | 'zero';

/**
 * Per-block verdicts for a volume of `blocks` blocks. A block is 'zero' only when discarded extents cover
 * it entirely; any changed byte makes it 'read'. Memory: one entry per touched block only.
 */
export function blockHints(extents: Extent[], blockSize: number, volumeSize: number): Map<number, BlockHint> {
  const out = new Map<number, BlockHint>();
  /** Discarded byte ranges per block, merged below (overlapping discards must not add up). */
  const zeroRanges = new Map<number, [number, number][]>();
  for (const e of extents) {
    if (e.length === 0 || e.offset >= volumeSize) continue;
    const end = Math.min(e.offset + e.length, volumeSize);
    for (let b = Math.floor(e.offset / blockSize); b * blockSize < end; b++) {
      if (e.exists) out.set(b, 'read');
      else {
        const ranges = zeroRanges.get(b) ?? [];
        ranges.push([Math.max(e.offset, b * blockSize), Math.min(end, (b + 1) * blockSize)]);
        zeroRanges.set(b, ranges);
      }
    }
  }
  for (const [b, ranges] of zeroRanges) {
    if (out.has(b)) continue;
    ranges.sort((x, y) => x[0] - y[0]);
    let covered = 0;
    let reach = b * blockSize;
    for (const [lo, hi] of ranges) {
      if (hi <= reach) continue;
      covered += hi - Math.max(lo, reach);
      reach = hi;
    }
    const blockLen = Math.min(blockSize, volumeSize - b * blockSize);
    // A block only partly discarded must be read.
    out.set(b, covered >= blockLen ? 'zero' : 'read');
  }
  return out;
}
