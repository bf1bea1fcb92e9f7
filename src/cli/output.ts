import Table from 'cli-table3';
import type { VersionRecord } from '../index/records.js';
import { displayLocal, formatAge } from '../util/time.js';
import { formatBytes } from '../util/size.js';

export { versionJson } from '../engine/versionJson.js';

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

/** Short status words, never colour alone: readable on any console. */
export function statusOf(v: VersionRecord): string {
  const words: string[] = [];
  if (!v.complete) words.push('incomplete');
  words.push(v.valid ? 'valid' : 'INVALID');
  if (v.protected) words.push('protected');
  return words.join(',');
}

export function versionsTable(versions: VersionRecord[]): string {
  const head = ['id', 'name', 'snapshot', 'date', 'age', 'size', 'status', 'tags'];
  const now = Date.now();
  const rows = versions.map((v) => [v.id, v.name, v.snapshot_name, displayLocal(new Date(v.date)), formatAge(now - Date.parse(v.date)), formatBytes(v.size), statusOf(v), v.tags.join(',')]);
  const plain = plainTable(head, rows);
  if (plain !== null) return plain;
  const table = new Table({ head, style: { head: [], border: [] } });
  for (const r of rows) table.push(r);
  return table.toString();
}

/** Printable ASCII only: one character is one column, as plainTable assumes. */
const SIMPLE = /^[\x20-\x7e]*$/;

/**
 * The same box table cli-table3 draws (borders, one space of padding, a rule between rows) for cells of
 * printable ASCII, in linear time: cli-table3 measures every cell through ANSI-aware width functions, which
 * made `ls` of 1,000 versions spend most of a second drawing. Null when a cell needs cli-table3.
 */
export function plainTable(head: string[], rows: string[][]): string | null {
  const widths = head.map((h) => h.length);
  for (const r of [head, ...rows]) {
    for (let c = 0; c < head.length; c++) {
      const cell = r[c] ?? '';
      if (!SIMPLE.test(cell)) return null;
      if (cell.length > widths[c]!) widths[c] = cell.length;
    }
  }
  const rule = (l: string, m: string, r: string) => l + widths.map((w) => '─'.repeat(w + 2)).join(m) + r;
  const line = (r: string[]) => '│' + widths.map((w, c) => ' ' + (r[c] ?? '').padEnd(w) + ' ').join('│') + '│';
  const between = rule('├', '┼', '┤');
  const out = [rule('┌', '┬', '┐'), line(head)];
  for (const r of rows) out.push(between, line(r));
  out.push(rule('└', '┴', '┘'));
  return out.join('\n');
}

export function keyValueTable(rows: [string, string][]): string {
  const table = new Table({ style: { head: [], border: [] } });
  for (const [k, v] of rows) table.push({ [k]: v });
  return table.toString();
}
