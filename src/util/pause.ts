import { existsSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';

/**
 * Test-only pause points, so that tests interleave processes by state instead of by timing.
 *
 * With BLOCKSAFE_TEST_PAUSE_DIR set and BLOCKSAFE_TEST_PAUSE naming a step (`backup.commit`) or its n-th
 * occurrence (`backup.commit#3`), the process stops at that step: it creates `<dir>/<step>.reached` and
 * waits until `<dir>/<step>.go` exists (a test then kills it, or lets it go on). Several steps are
 * separated by commas. Without the variables a pause point costs one comparison.
 */
const dir = process.env.BLOCKSAFE_TEST_PAUSE_DIR;
const wanted = dir && process.env.BLOCKSAFE_TEST_PAUSE ? process.env.BLOCKSAFE_TEST_PAUSE.split(',').map((s) => s.trim()) : [];
const seen = new Map<string, number>();

export async function pausePoint(step: string): Promise<void> {
  if (wanted.length === 0) return;
  const n = (seen.get(step) ?? 0) + 1;
  seen.set(step, n);
  const hit = wanted.find((w) => w === step || w === `${step}#${n}`);
  if (!hit) return;
  const base = path.join(dir!, hit.replace(/[^A-Za-z0-9._#-]/g, '_'));
  writeFileSync(`${base}.reached`, String(process.pid));
  while (!existsSync(`${base}.go`)) await new Promise((r) => setTimeout(r, 20));
}
