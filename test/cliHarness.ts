/**
 * Extra fixtures for the incremental / resume / locks / direct-I/O tests (on top of helpers.ts): running the
 * CLI in the background (to kill it or race it), polling, the benchmark image generator, per-block zero
 * maps, hints arithmetic and config files.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { BIN, cliEnv, prngBytes, ROOT, run, runJson, type CliResult, type RepoFixture, type VersionJson } from './helpers.js';

/** The version object of docs/CLI.md (the name older tests use). */
export type FullVersion = VersionJson;

/** The benchmark image generator of shared/ (beside the checkout, as in CI; /work/shared in a session). */
export const MKIMAGE = [path.join(ROOT, '..', 'shared', 'bench', 'mkimage.py'), '/work/shared/bench/mkimage.py'].find((p) => existsSync(p)) ?? path.join(ROOT, '..', 'shared', 'bench', 'mkimage.py');

/**
 * A fresh temporary directory on tmpfs (/dev/shm) when there is one, removed when the test ends. These
 * tests run many short CLI commands; on tmpfs their fsyncs cost nothing (a kill -9 does not lose the page
 * cache, so the crash tests prove the same thing), which keeps each file well under 20 s.
 */
export async function fastTempDir(t: { teardown(fn: () => unknown): void }, prefix = 'blocksafe-test-'): Promise<string> {
  let base = tmpdir();
  try {
    if ((await fs.stat('/dev/shm')).isDirectory()) base = '/dev/shm';
  } catch {
    // no /dev/shm: the normal temporary directory
  }
  const dir = await fs.mkdtemp(path.join(base, prefix));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

export interface Background {
  child: ChildProcess;
  pid: number;
  /** Settles when the process has exited (never rejects). */
  done: Promise<CliResult>;
  /** True once the process has exited. */
  exited(): boolean;
  /** Output so far. */
  stderr(): string;
  stdout(): string;
  /** SIGKILL, then wait for the exit. */
  kill9(): Promise<CliResult>;
}

/** Starts `node bin/blocksafe.js ...args` without waiting for it (stdin closed: not a terminal). */
export function spawnCli(args: readonly string[], env: Record<string, string | undefined> = {}): Background {
  const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, env: cliEnv(env), stdio: ['pipe', 'pipe', 'pipe'] });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  let exited = false;
  child.stdout!.on('data', (b: Buffer) => out.push(b));
  child.stderr!.on('data', (b: Buffer) => err.push(b));
  child.stdin!.on('error', () => undefined);
  child.stdin!.end();
  const done = new Promise<CliResult>((resolve) => {
    child.on('error', (e) => {
      exited = true;
      resolve({ code: null, signal: null, stdout: '', stderr: String(e) });
    });
    child.on('close', (code, signal) => {
      exited = true;
      resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') });
    });
  });
  if (child.pid === undefined) throw new Error('could not start the CLI');
  return {
    child,
    pid: child.pid,
    done,
    exited: () => exited,
    stderr: () => Buffer.concat(err).toString('utf8'),
    stdout: () => Buffer.concat(out).toString('utf8'),
    kill9: async () => {
      if (!exited) child.kill('SIGKILL');
      return done;
    },
  };
}

/** Makes sure a background CLI is gone when the test ends (even when it fails early). */
export function killOnTeardown(t: { teardown(fn: () => unknown): void }, bg: Background): Background {
  t.teardown(() => bg.kill9());
  return bg;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `probe` until it returns a non-undefined value; fails after `timeoutMs` with `what`. */
export async function waitFor<T>(what: string, probe: () => Promise<T | undefined> | T | undefined, timeoutMs = 60000, everyMs = 100): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** Runs the benchmark image generator (python3, stdlib only); returns its JSON summary. */
export async function mkimage<T = unknown>(args: string[]): Promise<T> {
  const { stdout } = await run('python3', [MKIMAGE, ...args]);
  return JSON.parse(stdout.trim().split('\n').pop()!) as T;
}

/** For each block of `file`: true when it holds any non-zero byte. */
export async function nonZeroBlocks(file: string, blockSize: number): Promise<boolean[]> {
  const fh = await fs.open(file, 'r');
  try {
    const size = (await fh.stat()).size;
    const out: boolean[] = [];
    const buf = Buffer.alloc(blockSize);
    for (let off = 0; off < size; off += blockSize) {
      const len = Math.min(blockSize, size - off);
      let got = 0;
      while (got < len) {
        const { bytesRead } = await fh.read(buf, got, len - got, off + got);
        if (bytesRead === 0) throw new Error(`short read in ${file}`);
        got += bytesRead;
      }
      out.push(buf.subarray(0, len).some((b) => b !== 0));
    }
    return out;
  } finally {
    await fh.close();
  }
}

export interface HintEntry {
  offset: number;
  length: number;
  exists: 'true' | 'false';
}

export async function readHints(file: string): Promise<HintEntry[]> {
  return JSON.parse(await fs.readFile(file, 'utf8')) as HintEntry[];
}

export async function writeHints(file: string, hints: HintEntry[]): Promise<void> {
  await fs.writeFile(file, JSON.stringify(hints) + '\n');
}

/** The distinct block indexes (below `blocks`) that the extents touch. */
export function touchedBlocks(hints: HintEntry[], blockSize: number, size: number): Set<number> {
  const out = new Set<number>();
  for (const h of hints) {
    const end = Math.min(h.offset + h.length, size);
    for (let b = Math.floor(h.offset / blockSize); b * blockSize < end && h.offset < end; b++) out.add(b);
  }
  return out;
}

/** Writes an INI config file, given its text or the keys of its [pipeline] section; returns its path. */
export async function writeConfig(dir: string, name: string, content: string | Record<string, string | number | boolean>): Promise<string> {
  const file = path.join(dir, name);
  const text = typeof content === 'string' ? content.replace(/^\s+/gm, '') : ['[pipeline]', ...Object.entries(content).map(([k, v]) => `${k} = ${v}`)].join('\n');
  await fs.writeFile(file, `${text}\n`);
  return file;
}

/** Writes `size` bytes of deterministic pseudo-random data. */
export async function randomFile(file: string, size: number, seed: string): Promise<void> {
  const fh = await fs.open(file, 'w');
  try {
    const chunk = 8 * 2 ** 20;
    for (let off = 0; off < size; off += chunk) {
      const len = Math.min(chunk, size - off);
      await fh.write(prngBytes(seed, `chunk${off}`, len), 0, len, off);
    }
  } finally {
    await fh.close();
  }
}

/** `ls --json` of a repository (optionally one name). */
export async function lsJson(repo: RepoFixture, name?: string): Promise<FullVersion[]> {
  return runJson<FullVersion[]>(['ls', ...repo.args, ...(name ? [name] : [])], { env: repo.env });
}

/** Synchronous check that a command exists. */
export function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/**
 * Test pause points (src/util/pause.ts): `env(steps)` makes a CLI process stop at those steps; `reached`
 * waits until it stopped there (or exited), `go` lets it continue. Synchronises on state, not on time.
 */
export async function pausePoints(t: { teardown(fn: () => unknown): void }) {
  const dir = await fastTempDir(t, 'blocksafe-pause-');
  const file = (step: string, what: 'reached' | 'go') => path.join(dir, `${step}.${what}`);
  return {
    env: (...steps: string[]) => ({ BLOCKSAFE_TEST_PAUSE_DIR: dir, BLOCKSAFE_TEST_PAUSE: steps.join(',') }),
    /** Resolves once the process reached `step`; false when it exited first. */
    reached: (step: string, bg: { exited(): boolean }) => waitFor(`pause point ${step}`, () => (existsSync(file(step, 'reached')) ? true : bg.exited() ? false : undefined), 120_000, 20),
    go: (step: string) => fs.writeFile(file(step, 'go'), ''),
  };
}
