/** Text helpers of the terminal UI: fixed-width columns, dates, sizes, status words. */
import type { VersionRecord } from '../src/index/records.js';
import { formatBytes } from '../src/util/size.js';
import { displayLocal, formatAge, formatDuration } from '../src/util/time.js';

export { formatBytes, formatDuration };

/** Pads or cuts `s` to exactly `n` columns (an ellipsis marks a cut). */
export function fit(s: string, n: number): string {
  if (n <= 0) return '';
  if (s.length <= n) return s.padEnd(n);
  return n === 1 ? '…' : s.slice(0, n - 1) + '…';
}

export function fitRight(s: string, n: number): string {
  if (s.length >= n) return fit(s, n);
  return s.padStart(n);
}

/** "2026-11-27 03:12 +01:00": local time with the UTC offset, without seconds (list rows). */
export function shortDate(iso: string): string {
  const full = displayLocal(new Date(iso));
  return full.slice(0, 16) + full.slice(19);
}

/** "2026-11-27 03:12:45 +01:00". */
export function longDate(iso: string): string {
  return displayLocal(new Date(iso));
}

export function age(iso: string, now = Date.now()): string {
  return formatAge(now - Date.parse(iso));
}

export type StatusWord = 'valid' | 'INVALID' | 'incomplete' | 'protected';

/** Status as words (never colour alone): incomplete first, then valid/INVALID, then protected. */
export function statusWords(v: VersionRecord): StatusWord[] {
  const out: StatusWord[] = [];
  // An incomplete version is not "valid" whatever its blocks are: it cannot be restored.
  if (!v.complete) out.push('incomplete');
  if (!v.valid) out.push('INVALID');
  else if (v.complete) out.push('valid');
  if (v.protected) out.push('protected');
  return out;
}

export function statusColor(w: StatusWord): string | undefined {
  switch (w) {
    case 'INVALID':
      return 'red';
    case 'incomplete':
      return 'yellow';
    case 'protected':
      return 'cyan';
    default:
      return 'green';
  }
}

/** "1 block", "16 blocks". */
export function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

export function blocksOf(v: VersionRecord): number {
  return Math.ceil(v.size / v.block_size);
}

/** "12.0 %". */
export function percent(done: number, total: number): string {
  return `${(total > 0 ? (100 * done) / total : 100).toFixed(1)} %`;
}

/** "█████░░░░░" of `width` cells (block elements exist in the Linux console font). */
export function bar(done: number, total: number, width: number): string {
  const w = Math.max(1, width);
  const filled = Math.max(0, Math.min(w, Math.round((total > 0 ? done / total : 1) * w)));
  return '█'.repeat(filled) + '░'.repeat(w - filled);
}

/** The name a user types to confirm overwriting a path: its last component ("sdb", "root.img"). */
export function confirmName(path: string): string {
  const parts = path.split('/').filter(Boolean);
  return parts[parts.length - 1] ?? path;
}
