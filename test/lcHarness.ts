/**
 * Small fixtures for the integrity and lifecycle tests (scrub, lifecycle, prune, cleanup), on top of
 * helpers.ts: tmpfs directories, the CLI with --json whatever the exit code, the block objects of a
 * repository (paths, sizes, access times) and ways to damage them. Background commands, pause points and
 * config files: cliHarness.ts.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { fastTempDir } from './cliHarness.js';

export { writeConfig } from './cliHarness.js';
import { listObjects, runCli, type CliResult, type RepoFixture, type VersionJson } from './helpers.js';

/** A fresh temporary directory on tmpfs when there is one (see cliHarness.fastTempDir). */
export function shmDir(t: ExecutionContext, prefix = 'blocksafe-lc-'): Promise<string> {
  return fastTempDir(t, prefix);
}

export interface JsonResult<T> {
  code: number | null;
  json: T;
  stderr: string;
}

/** Runs `blocksafe <args> --repo … --json` and parses stdout whatever the exit code (scrub and restore exit 3 with a report). */
export async function cliJson<T = unknown>(repo: RepoFixture, args: readonly string[], extra: readonly string[] = []): Promise<JsonResult<T>> {
  const [command, ...rest] = args;
  const r: CliResult = await runCli([...command!.split(' '), ...repo.args, ...extra, ...rest, '--json'], { env: repo.env });
  let json: T;
  try {
    json = JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`blocksafe ${args.join(' ')} --json (exit ${r.code}) printed no JSON:\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
  return { code: r.code, json, stderr: r.stderr };
}

/** Like cliJson but requires exit 0. */
export async function okJson<T = unknown>(repo: RepoFixture, args: readonly string[], extra: readonly string[] = []): Promise<T> {
  const r = await cliJson<T>(repo, args, extra);
  if (r.code !== 0) throw new Error(`blocksafe ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r.json;
}

/** Runs a command that must succeed (no --json). */
export async function ok(repo: RepoFixture, args: readonly string[], extra: readonly string[] = []): Promise<CliResult> {
  const [command, ...rest] = args;
  const r = await runCli([...command!.split(' '), ...repo.args, ...extra, ...rest], { env: repo.env });
  if (r.code !== 0) throw new Error(`blocksafe ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r;
}

export async function ls(repo: RepoFixture, ...filters: string[]): Promise<VersionJson[]> {
  return okJson<VersionJson[]>(repo, ['ls', ...filters]);
}

/** id → valid, from `ls --json`. */
export async function validity(repo: RepoFixture): Promise<Record<string, boolean>> {
  return Object.fromEntries((await ls(repo)).map((v) => [v.id, v.valid]));
}

// ------------------------------------------------------------------------------------------ JSON shapes

export interface ScrubJson {
  blocks_selected: number;
  blocks_checked: number;
  bytes_checked: number;
  damaged: { checksum: string; reason: string }[];
  invalidated_versions: string[];
  invalid_versions: string[];
  revalidated_versions: string[];
  source_differences: { block: number; offset: number; length: number }[];
  blocks_due: number | null;
}

export interface RestoreJson {
  version: string;
  target: string;
  size: number;
  bytes_written: number;
  damaged: { offset: number; length: number; reason: string }[];
}

export interface DuJson {
  versions: { id: string; name: string; date: string; size: number; referenced_bytes: number; exclusive_bytes: number; shared_bytes: number }[];
  stored_bytes: number;
  unreferenced_bytes: number;
}

export interface CheckJson {
  objects_in_store: number;
  blocks_in_index: number;
  missing_objects: string[];
  unknown_objects: string[];
}

export interface CleanupJson {
  marked: number;
  unmarked: number;
  deleted: number;
  bytes_freed: number;
  waiting: number;
  grace_ms: number;
  temp_files_removed: number;
}

// ---------------------------------------------------------------------------------------- block objects

/** The checksum (hex object name) of a `data/xx/<hex>` path. */
export const hexOf = (rel: string) => rel.slice(rel.lastIndexOf('/') + 1);

/** Block objects of a repository: hex → absolute path. */
export async function objects(repoDir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const rel of await listObjects(repoDir)) out.set(hexOf(rel), path.join(repoDir, rel));
  return out;
}

/** Total size in bytes of all files under data/ (the block objects). */
export async function dataBytes(repoDir: string): Promise<number> {
  let n = 0;
  for (const p of (await objects(repoDir)).values()) n += (await fs.stat(p)).size;
  return n;
}

/**
 * Sets the access time of every block object far into the past. On a relatime mount the next read of an
 * object then moves its atime forward, so `readSinceReset` tells which objects a command read.
 */
export async function resetAtimes(repoDir: string): Promise<void> {
  for (const p of (await objects(repoDir)).values()) {
    const st = await fs.stat(p);
    await fs.utimes(p, new Date(1000), st.mtime);
  }
}

/** Objects read since the last `resetAtimes` (hex names, sorted). */
export async function readSinceReset(repoDir: string): Promise<string[]> {
  const out: string[] = [];
  for (const [hex, p] of await objects(repoDir)) if ((await fs.stat(p)).atimeMs > 1000) out.push(hex);
  return out.sort();
}

export type Damage = 'bitflip' | 'truncate' | 'delete' | 'replace';

/** Damages one object file in place. `other` is the object copied over it for 'replace'. */
export async function damageObject(file: string, kind: Damage, other?: string): Promise<void> {
  switch (kind) {
    case 'bitflip': {
      const buf = await fs.readFile(file);
      buf[Math.floor(buf.length / 2)]! ^= 0x10;
      await fs.writeFile(file, buf);
      return;
    }
    case 'truncate': {
      const st = await fs.stat(file);
      await fs.truncate(file, Math.floor(st.size / 2));
      return;
    }
    case 'delete':
      await fs.rm(file);
      return;
    case 'replace':
      if (!other) throw new Error('replace needs another object');
      await fs.copyFile(other, file);
      return;
  }
}

/** True when `length` bytes at `offset` of `file` are all zero. */
export async function isZeroRange(file: string, offset: number, length: number): Promise<boolean> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    return bytesRead === length && buf.every((b) => b === 0);
  } finally {
    await fh.close();
  }
}

/** Overwrites `data.length` bytes at `offset` of `file`. */
export async function overwriteAt(file: string, offset: number, data: Buffer): Promise<void> {
  const fh = await fs.open(file, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}
