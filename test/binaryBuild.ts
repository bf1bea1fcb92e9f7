/**
 * The single executable for the tests that run it (test/binary.test.ts, test/binary-oldglibc.test.ts):
 * build/out/blocksafe, (re)built by `node build/build-binary.mjs` when it is missing or older than any source
 * (src/, ui/, build/, package.json, package-lock.json). `npm test` (scripts/test.sh) builds it first, so
 * normally it is only checked.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const BUILT = path.join(ROOT, 'build', 'out', 'blocksafe');
export const MANIFEST = path.join(ROOT, 'build', 'out', 'native-manifest.json');

function newestMtime(entry: string): number {
  let st: fs.Stats;
  try {
    st = fs.statSync(entry);
  } catch {
    return 0;
  }
  if (!st.isDirectory()) return st.mtimeMs;
  let newest = st.mtimeMs;
  for (const name of fs.readdirSync(entry)) {
    if (name === 'out' && entry === path.join(ROOT, 'build')) continue;
    if (name === 'node_modules') continue;
    newest = Math.max(newest, newestMtime(path.join(entry, name)));
  }
  return newest;
}

function binaryIsStale(): boolean {
  if (!fs.existsSync(BUILT) || !fs.existsSync(MANIFEST)) return true;
  const sources = ['src', 'ui', 'build', 'package.json', 'package-lock.json'].map((p) => newestMtime(path.join(ROOT, p)));
  return Math.max(...sources) > fs.statSync(BUILT).mtimeMs;
}

function runAsync(cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr.on('data', (b: Buffer) => (out += b.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, out }));
  });
}

/** Builds the executable when it is missing or stale. */
export async function ensureBinary(t: { log(...values: unknown[]): void }): Promise<void> {
  if (!binaryIsStale()) return;
  t.log('build/out/blocksafe is missing or older than the sources: building it (npm run build:binary does the same)');
  const r = await runAsync(process.execPath, [path.join(ROOT, 'build', 'build-binary.mjs'), '--quiet']);
  if (r.code !== 0) throw new Error(`node build/build-binary.mjs failed:\n${r.out}`);
}
