/**
 * Shared fixtures of the blocksafe tests: temporary directories, running the real CLI, deterministic
 * image generation, hashing, repository snapshots and loop devices.
 */
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import test, { type ExecutionContext } from 'ava';
import type { VersionJson } from '../src/engine/versionJson.js';
import type { VersionStats } from '../src/index/records.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const BIN = path.join(ROOT, 'bin', 'blocksafe.js');
export const MiB = 2 ** 20;
export const DEFAULT_BLOCK = 4 * MiB;
export const PASSPHRASE = 'correct horse battery staple';

const execFileP = promisify(execFile);

// ---------------------------------------------------------------------------------------------- temp dirs

/** A fresh temporary directory, removed (with everything in it) when the test ends. */
export async function tempDir(t: ExecutionContext, prefix = 'blocksafe-test-'): Promise<string> {
  const dir = await fs.mkdtemp(path.join(tmpdir(), prefix));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

// ------------------------------------------------------------------------------------------------- CLI

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface CliOptions {
  /** Extra environment; BLOCKSAFE_* variables of the calling environment are never inherited. */
  env?: Record<string, string | undefined>;
  /** Written to stdin (stdin is closed either way, so nothing waits for a terminal). */
  input?: string | Buffer;
  cwd?: string;
}

/** The environment of a CLI run: this process's, without BLOCKSAFE_* and NODE_OPTIONS, plus `extra`. */
export function cliEnv(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BLOCKSAFE_') && !k.startsWith('NODE_OPTIONS')) env[k] = v;
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

/** Runs `node bin/blocksafe.js ...args` from the repository root. */
export function runCli(args: readonly string[], opts: CliOptions = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: opts.cwd ?? ROOT, env: cliEnv(opts.env), stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.stdin.on('error', () => undefined); // the CLI may exit before reading its input
    child.on('close', (code, signal) => resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') }));
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Runs the CLI and fails (with its stderr) unless it exits 0. */
export async function runOk(args: readonly string[], opts: CliOptions = {}): Promise<CliResult> {
  const r = await runCli(args, opts);
  if (r.code !== 0) throw new Error(`blocksafe ${args.join(' ')} exited ${r.code ?? r.signal}:\n${r.stderr}${r.stdout}`);
  return r;
}

/** Runs the CLI with --json, expects exit 0, and parses stdout. */
export async function runJson<T = unknown>(args: readonly string[], opts: CliOptions = {}): Promise<T> {
  const r = await runOk([...args, '--json'], opts);
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`blocksafe ${args.join(' ')} --json printed no JSON:\n${r.stdout}`);
  }
}

/**
 * Asserts the error contract: the exact exit code, and stderr is a single line starting with
 * "blocksafe: " (no stack trace, nothing on stdout). Returns the message (without the prefix).
 */
export function assertCliError(t: ExecutionContext, r: CliResult, code: number, pattern?: RegExp): string {
  t.is(r.code, code, `exit code (stderr: ${r.stderr.trim()})`);
  const lines = r.stderr.replace(/\n$/, '').split('\n');
  t.is(lines.length, 1, `stderr must be one line, got:\n${r.stderr}`);
  t.true(lines[0]!.startsWith('blocksafe: '), `stderr must start with "blocksafe: ", got: ${lines[0]}`);
  t.is(r.stdout, '', 'nothing on stdout');
  if (pattern) t.regex(lines[0]!, pattern);
  return lines[0]!.slice('blocksafe: '.length);
}

// ------------------------------------------------------------------------------------------ repositories

export interface RepoFixture {
  dir: string;
  /** Global arguments every command needs: --repo (and --key-file for key-file repositories). */
  args: string[];
  /** Environment with the passphrase (empty for key-file and plain repositories). */
  env: Record<string, string>;
}

export interface InitOptions {
  encryption?: 'chacha20-poly1305' | 'none';
  blockSize?: string;
  keyFile?: string;
  passphrase?: string;
  extra?: string[];
}

/** Creates a repository in `dir` (which must not exist or be empty) and returns how to reach it. */
export async function initRepo(dir: string, opts: InitOptions = {}): Promise<RepoFixture> {
  const args = ['--repo', dir];
  const env: Record<string, string> = {};
  if (opts.keyFile) args.push('--key-file', opts.keyFile);
  else if (opts.encryption !== 'none') env.BLOCKSAFE_PASSPHRASE = opts.passphrase ?? PASSPHRASE;
  const initArgs = ['init', ...args];
  if (opts.encryption) initArgs.push('--encryption', opts.encryption);
  if (opts.blockSize) initArgs.push('--block-size', opts.blockSize);
  await runOk([...initArgs, ...(opts.extra ?? [])], { env });
  return { dir, args, env };
}

/**
 * An encrypted repository unlocked by a key file (written next to it). The codec path is the same as with a
 * passphrase, but opening costs an HKDF instead of a deliberately slow scrypt, which keeps the tests fast.
 */
export async function initKeyFileRepo(dir: string, opts: Omit<InitOptions, 'keyFile' | 'encryption'> = {}): Promise<RepoFixture & { keyFile: string }> {
  const keyFile = `${dir}.key`;
  await fs.writeFile(keyFile, randomBytes(64), { mode: 0o600 });
  return { ...(await initRepo(dir, { ...opts, keyFile })), keyFile };
}

/** Backs up `source` as a version of `name`; returns the version object printed by --json. */
export async function backupJson(repo: RepoFixture, source: string, name: string, extra: string[] = []): Promise<VersionJson> {
  return runJson<VersionJson>(['backup', ...repo.args, source, name, ...extra], { env: repo.env });
}

/** The JSON form of a version and its statistics, as the CLI prints them (one definition: the engine's). */
export type { VersionJson, VersionStats };

/** Relative paths of all files below `dir` (sorted). */
export async function listFiles(dir: string, under = ''): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    let entries: import('node:fs').Dirent[];
    try {
      entries = await fs.readdir(path.join(dir, rel), { withFileTypes: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    for (const e of entries) {
      const child = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(child);
      else out.push(child);
    }
  };
  await walk(under);
  return out.sort();
}

/** The block objects of a repository (`data/xx/<64 hex>`). */
export async function listObjects(repoDir: string): Promise<string[]> {
  return listFiles(repoDir, 'data');
}

/**
 * Everything a repository's blob store holds, as sorted "path sha256" lines (directories as "path/"). The
 * LMDB index is left out: every command, even a refused one, may take and release a lock in it. Its logical
 * content is compared by `repoState`.
 */
export async function repoSnapshot(dir: string): Promise<string[]> {
  const lines: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    const entries = await fs.readdir(path.join(dir, rel), { withFileTypes: true });
    for (const e of entries) {
      const child = rel ? `${rel}/${e.name}` : e.name;
      if (child === 'index') continue;
      if (e.isDirectory()) {
        // locks/ holds a command's lease while it runs: its files count (a lease left behind is a
        // difference), the directory itself does not.
        if (child !== 'locks') lines.push(`${child}/`);
        await walk(child);
      } else {
        lines.push(`${child} ${await sha256File(path.join(dir, child))}`);
      }
    }
  };
  await walk('');
  return lines.sort();
}

export interface RepoState {
  files: string[];
  /** `stats --json`: repository totals (versions, incomplete/invalid versions, blocks, bytes) and each version's stats. */
  stats: unknown;
}

/** What "the repository is unchanged" compares: the blob store byte for byte and the index's content. */
export async function repoState(repo: RepoFixture): Promise<RepoState> {
  const files = await repoSnapshot(repo.dir);
  const stats = await runJson(['stats', ...repo.args], { env: repo.env });
  return { files, stats };
}

// ---------------------------------------------------------------------------------------------- hashing

/** sha256 (hex) of a file or device, or of `length` bytes of it from `start`. */
export function sha256File(file: string, range?: { start: number; length: number }): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    if (range && range.length === 0) return resolve(hash.digest('hex'));
    const stream = createReadStream(file, range ? { start: range.start, end: range.start + range.length - 1 } : {});
    stream.on('data', (b) => hash.update(b));
    stream.on('error', reject);
    stream.on('end', () => resolve(hash.digest('hex')));
  });
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Reads `length` bytes at `position` of a file or device. */
export async function readRange(file: string, position: number, length: number): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await fh.read(buf, done, length - done, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return buf.subarray(0, done);
  } finally {
    await fh.close();
  }
}

// ------------------------------------------------------------------------------------- image generation

export type ContentKind = 'zero' | 'random' | 'text';
/** A block of an image: fresh content of a kind, or a copy of an earlier block (by index). */
export type BlockSpec = ContentKind | { dup: number };

export interface ImageLayout {
  blocks: BlockSpec[];
  /** Default 4 MiB. */
  blockSize?: number;
  /** A last, partial block (so the size is not a multiple of the block size). */
  tail?: { bytes: number; kind: ContentKind };
  /** Different seeds give different content; the same seed always the same bytes. */
  seed?: string;
}

export interface Image {
  path: string;
  size: number;
  blockSize: number;
  sha256: string;
  /** sha256 of each block (including the tail) in order. */
  blockHashes: string[];
  /** Kind of each block after resolving duplicates. */
  kinds: ContentKind[];
}

/** Deterministic pseudo-random bytes: AES-256-CTR keystream keyed by (seed, stream). */
export function prngBytes(seed: string, stream: string, length: number): Buffer {
  const key = createHash('sha256').update(`key:${seed}`).digest();
  const iv = createHash('sha256').update(`iv:${seed}:${stream}`).digest().subarray(0, 16);
  return createCipheriv('aes-256-ctr', key, iv).update(Buffer.alloc(length));
}

const WORDS = (
  'block backup restore volume snapshot device repository version manifest checksum the a of and to in is ' +
  'for on with that this by from disk image sparse zero encrypt compress verify index blob store offset ' +
  'length kernel loop ext4 inode journal superblock extent bitmap directory file data metadata error'
).split(' ');

/** Text-like, well-compressible content that is still unique per (seed, stream). */
export function textBytes(seed: string, stream: string, length: number): Buffer {
  const rnd = prngBytes(seed, `text:${stream}`, Math.ceil(length / 3) + 64);
  const parts: string[] = [];
  let size = 0;
  let line = 0;
  let r = 0;
  while (size < length) {
    let s = `${stream}:${line++} `;
    const words = 4 + (rnd[r++ % rnd.length]! % 10);
    for (let w = 0; w < words; w++) s += WORDS[rnd[r++ % rnd.length]! % WORDS.length] + ' ';
    s += '\n';
    parts.push(s);
    size += s.length;
  }
  return Buffer.from(parts.join(''), 'latin1').subarray(0, length);
}

function content(kind: ContentKind, seed: string, stream: string, length: number): Buffer {
  if (kind === 'zero') return Buffer.alloc(length);
  if (kind === 'random') return prngBytes(seed, stream, length);
  return textBytes(seed, stream, length);
}

/** Writes an image of the given layout (zeros written out, not holes) and describes it. */
export async function makeImage(file: string, layout: ImageLayout): Promise<Image> {
  const bs = layout.blockSize ?? DEFAULT_BLOCK;
  const seed = layout.seed ?? 'blocksafe';
  const fh = await fs.open(file, 'w');
  const whole = createHash('sha256');
  const blockHashes: string[] = [];
  const kinds: ContentKind[] = [];
  const made: Buffer[] = [];
  let offset = 0;
  try {
    const write = async (buf: Buffer, kind: ContentKind) => {
      await fh.write(buf, 0, buf.length, offset);
      offset += buf.length;
      whole.update(buf);
      blockHashes.push(sha256(buf));
      kinds.push(kind);
    };
    for (const [i, spec] of layout.blocks.entries()) {
      let buf: Buffer;
      let kind: ContentKind;
      if (typeof spec === 'object') {
        if (!(spec.dup < i)) throw new Error(`block ${i} duplicates block ${spec.dup}, which does not come before it`);
        buf = made[spec.dup]!;
        kind = kinds[spec.dup]!;
      } else {
        kind = spec;
        buf = content(spec, seed, `block${i}`, bs);
      }
      made.push(buf);
      await write(buf, kind);
    }
    if (layout.tail && layout.tail.bytes > 0) await write(content(layout.tail.kind, seed, 'tail', layout.tail.bytes), layout.tail.kind);
  } finally {
    await fh.close();
  }
  return { path: file, size: offset, blockSize: bs, sha256: whole.digest('hex'), blockHashes, kinds };
}

/** Compares `file` with `image` block by block; returns the indexes of blocks that differ. */
export async function differingBlocks(file: string, image: Image): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < image.blockHashes.length; i++) {
    const start = i * image.blockSize;
    const length = Math.min(image.blockSize, image.size - start);
    if ((await sha256File(file, { start, length })) !== image.blockHashes[i]) out.push(i);
  }
  return out;
}

// ---------------------------------------------------------------------------------------- external tools

export async function run(cmd: string, args: readonly string[], opts: { cwd?: string } = {}): Promise<{ stdout: string; stderr: string }> {
  try {
    return await execFileP(cmd, args, { cwd: opts.cwd, maxBuffer: 64 * MiB });
  } catch (err) {
    const e = err as Error & { stdout?: string; stderr?: string; code?: number };
    throw new Error(`${cmd} ${args.join(' ')} failed (${e.code}): ${e.stderr ?? ''}${e.stdout ?? ''}`, { cause: err });
  }
}

/** Runs a command and returns its exit code and output without throwing. */
export function runStatus(cmd: string, args: readonly string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 * MiB }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

export function haveCommand(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

let loopOk: boolean | undefined;
/** True when loop devices can be attached here (root, losetup present, a free device available). */
/** Under CI=true a missing tool or privilege must fail the tests that need it; elsewhere they are skipped. */
export const CI = process.env.CI === 'true';

/** `test` when `available` (or under CI, where the test then fails on what is missing), else `test.skip`. */
export function testIf(available: boolean): typeof test | typeof test.skip {
  return available || CI ? test : test.skip;
}

export function loopDevicesWork(): boolean {
  if (loopOk === undefined) {
    loopOk = process.getuid?.() === 0 && haveCommand('losetup') && spawnSync('losetup', ['-f'], { stdio: 'ignore' }).status === 0;
  }
  return loopOk;
}

/** Attaches `file` to a free loop device, detached again when the test ends. */
export async function attachLoop(t: ExecutionContext, file: string): Promise<string> {
  const { stdout } = await run('losetup', ['-f', '--show', file]);
  const dev = stdout.trim();
  if (!dev.startsWith('/dev/loop')) throw new Error(`losetup printed "${dev}"`);
  t.teardown(async () => {
    for (let attempt = 0; attempt < 10; attempt++) {
      if (spawnSync('losetup', ['-d', dev], { stdio: 'ignore' }).status === 0) return;
      await new Promise((r) => setTimeout(r, 100));
    }
  });
  return dev;
}

/** Creates a zero-filled (sparse) file of `size` bytes. */
export async function zeroFile(file: string, size: number): Promise<void> {
  const fh = await fs.open(file, 'w');
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

/** Flips one bit of a byte in a file, in place. */
export async function flipBit(file: string, offset: number, bit = 0): Promise<void> {
  const fh = await fs.open(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, offset);
    b[0] = b[0]! ^ (1 << bit);
    await fh.write(b, 0, 1, offset);
  } finally {
    await fh.close();
  }
}

/** Sets one byte of a file, in place. */
export async function setByte(file: string, offset: number, value: number): Promise<void> {
  const fh = await fs.open(file, 'r+');
  try {
    await fh.write(Buffer.from([value]), 0, 1, offset);
  } finally {
    await fh.close();
  }
}
