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
  const table = new Table({
    head: ['id', 'name', 'snapshot', 'date', 'age', 'size', 'status', 'tags'],
    style: { head: [], border: [] },
  });
  const now = Date.now();
  for (const v of versions) {
    table.push([v.id, v.name, v.snapshot_name, displayLocal(new Date(v.date)), formatAge(now - Date.parse(v.date)), formatBytes(v.size), statusOf(v), v.tags.join(',')]);
  }
  return table.toString();
}

export function keyValueTable(rows: [string, string][]): string {
  const table = new Table({ style: { head: [], border: [] } });
  for (const [k, v] of rows) table.push({ [k]: v });
  return table.toString();
}
