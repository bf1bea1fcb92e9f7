/**
 * LVM sources: `backup lvm://VG/LV NAME`.
 *
 * openLvmSource() snapshots the logical volume and hands back the snapshot's block device to read; finish()
 * cleans up afterwards. Two kinds of volumes:
 *
 *  - classic (linear, striped, raid, …): a read-only COW snapshot with a size (`--snapshot-size`, default
 *    10 % of the origin) that is always removed by finish();
 *  - thin (lv_attr[0] == 'V'): a read-only thin snapshot without a size. After a successful backup it is
 *    KEPT and the previous kept snapshot is removed; the next backup compares the two with `thin_delta`
 *    on a reserved metadata snapshot of the pool and gets the changed extents as hints, so it reads only
 *    what changed. After a failed backup the new snapshot is removed and the previous one kept.
 *
 * Every external command goes through a CommandRunner so that tests can substitute them (the kernel of the
 * development machine has no device-mapper; see docs/LVM.md).
 */
import { spawn } from 'node:child_process';
import { childEnvironment } from '../util/secrets.js';
import { access } from 'node:fs/promises';
import type { Extent } from './hints.js';
import { ThinDeltaParser } from './thinDelta.js';
import { BlocksafeError, NotFoundError, RefusedError, UsageError } from '../errors.js';

// ---------------------------------------------------------------------------------------------------------
// Running commands

export interface RunOptions {
  /** Receives stdout as it arrives; then the result's stdout is ''. */
  onStdout?: (chunk: string) => void;
}
export interface CommandResult {
  stdout: string;
  stderr: string;
}
/** Runs `command args…` (no shell) and resolves with its output, or rejects with a CommandError. */
export type CommandRunner = (command: string, args: readonly string[], options?: RunOptions) => Promise<CommandResult>;

/** A command that could not be started or exited non-zero. `message` is "<command> failed: <reason>". */
export class CommandError extends BlocksafeError {
  constructor(
    message: string,
    readonly command: string,
    readonly stderr: string,
    readonly exitStatus: number | null,
    readonly missing: boolean,
  ) {
    super(message);
  }
}

const INSTALL_HINT: Record<string, string> = {
  lvs: 'lvm2',
  lvcreate: 'lvm2',
  lvremove: 'lvm2',
  lvchange: 'lvm2',
  dmsetup: 'dmsetup (it comes with lvm2)',
  thin_delta: 'thin-provisioning-tools',
};

/** Lines LVM prints that do not say what went wrong. */
const NOISE = [/leaked on \S+ invocation/, /^Run `\S+ --help' for more information\.?$/, /^Command failed\.?$/, /^Cannot process volume group /];

/** The last line of stderr that says something (LVM ends many errors with generic lines). */
export function lastMeaningfulLine(stderr: string): string {
  let lines = stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
  // thin-provisioning-tools print their usage text after the error: keep what comes before it.
  const usage = lines.findIndex((l) => /^Usage: /.test(l));
  if (usage > 0) lines = lines.slice(0, usage);
  for (let i = lines.length - 1; i >= 0; i--) {
    if (!NOISE.some((re) => re.test(lines[i]!))) return lines[i]!;
  }
  return lines[lines.length - 1] ?? '';
}

const STDERR_KEEP = 64 * 1024;

/** The default runner (child_process.spawn, no shell), with `env` for the child (default process.env). */
export function createCommandRunner(options: { env?: NodeJS.ProcessEnv } = {}): CommandRunner {
  // Secrets (passphrases, S3 keys) stay in this process: lvm and its helpers never see them.
  const env = { ...childEnvironment(options.env ?? process.env), LVM_SUPPRESS_FD_WARNINGS: '1' };
  return (command, args, runOptions) =>
    new Promise<CommandResult>((resolve, reject) => {
      let child;
      try {
        child = spawn(command, [...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      } catch (err) {
        reject(startError(command, err));
        return;
      }
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8');
      child.stderr.setEncoding('utf8');
      child.stdout.on('data', (chunk: string) => {
        if (runOptions?.onStdout) runOptions.onStdout(chunk);
        else stdout += chunk;
      });
      child.stderr.on('data', (chunk: string) => {
        stderr += chunk;
        if (stderr.length > 2 * STDERR_KEEP) stderr = stderr.slice(-STDERR_KEEP);
      });
      let settled = false;
      child.on('error', (err) => {
        if (settled) return;
        settled = true;
        reject(startError(command, err));
      });
      child.on('close', (code, signal) => {
        if (settled) return;
        settled = true;
        if (code === 0) {
          resolve({ stdout, stderr });
          return;
        }
        const line = lastMeaningfulLine(stderr);
        const reason = line || (signal ? `killed by signal ${signal}` : `exit status ${code}`);
        reject(new CommandError(`${command} failed: ${reason}`, command, stderr, code, false));
      });
    });
}

function startError(command: string, err: unknown): CommandError {
  const e = err as NodeJS.ErrnoException;
  if (e?.code === 'ENOENT') {
    const pkg = INSTALL_HINT[command];
    const what = pkg ? `install ${pkg} (e.g. apt-get install ${pkg.split(' ')[0]})` : 'install it';
    return new CommandError(`${command} was not found on PATH; ${what} to back up LVM volumes.`, command, '', null, true);
  }
  if (e?.code === 'EACCES') {
    return new CommandError(`${command} failed: permission denied starting it; run blocksafe as root to back up LVM volumes.`, command, '', null, false);
  }
  return new CommandError(`${command} failed: ${e?.message ?? String(err)}`, command, '', null, false);
}

/** The runner used when none is injected. */
export const defaultCommandRunner: CommandRunner = (command, args, options) => createCommandRunner()(command, args, options);

// ---------------------------------------------------------------------------------------------------------
// URIs and names

/** LVM's own rule for VG and LV names. */
const LVM_NAME = /^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$/;

function validName(s: string): boolean {
  return LVM_NAME.test(s) && s !== '.' && s !== '..' && s.length <= 127;
}

/** `lvm://VG/LV` → { vg, lv }; anything else is a UsageError. */
export function parseLvmUri(uri: string): { vg: string; lv: string } {
  const m = /^lvm:\/\/([^/]*)\/([^/]*)$/.exec(uri);
  const example = 'write it as lvm://VOLUMEGROUP/VOLUME, e.g. lvm://vg0/home';
  if (!m) throw new UsageError(`"${uri}" is not an LVM source; ${example}.`);
  const vg = m[1]!;
  const lv = m[2]!;
  if (!validName(vg)) throw new UsageError(`"${uri}" does not name a valid volume group ("${vg}"); ${example}.`);
  if (!validName(lv)) throw new UsageError(`"${uri}" does not name a valid logical volume ("${lv}"); ${example}.`);
  return { vg, lv };
}

/** device-mapper names double the hyphens inside VG and LV names: vg-0/my-pool → vg--0-my--pool. */
export function dmName(vg: string, lv: string): string {
  return `${vg.replace(/-/g, '--')}-${lv.replace(/-/g, '--')}`;
}

function stamp(d: Date): string {
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getFullYear(), 4)}${p(d.getMonth() + 1)}${p(d.getDate())}${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** True for snapshot names blocksafe makes for `lv`: `<LV>-blocksafe-<yyyymmddhhmmss>[-N]`. */
export function isBlocksafeSnapshotName(lv: string, name: string): boolean {
  return new RegExp(`^${escapeRegExp(lv)}-blocksafe-\\d{14}(?:-\\d+)?$`).test(name);
}

/** `--snapshot-size` value → lvcreate arguments: "5G", "512m", "800000b" → --size; "10%ORIGIN" → --extents. */
export function snapshotSizeArgs(size: string): string[] {
  const s = size.trim();
  if (/^\d+(?:\.\d+)?[bBsSkKmMgGtTpPeE]?$/.test(s)) return ['--size', s];
  const pct = /^(\d+(?:\.\d+)?)%(ORIGIN|VG|FREE|PVS)$/i.exec(s);
  if (pct && Number(pct[1]) > 0) return ['--extents', `${pct[1]}%${pct[2]!.toUpperCase()}`];
  throw new UsageError(`Snapshot size "${size}" is not understood; give a size such as 5G or 512M, or a percentage such as 10%ORIGIN or 50%FREE.`);
}

// ---------------------------------------------------------------------------------------------------------
// lvs

export interface LvInfo {
  name: string;
  vg: string;
  attr: string;
  size: number;
  pool: string;
  origin: string;
  thinId: number | null;
  chunkSize: number;
  path: string;
}

const LVS_FIELDS = 'lv_name,vg_name,lv_attr,lv_size,pool_lv,origin,thin_id,chunk_size,lv_path';

function lvsArgs(target: string): string[] {
  return ['--noheadings', '--nosuffix', '--units', 'b', '--separator', '|', '-o', LVS_FIELDS, target];
}

function num(s: string): number {
  const t = s.trim();
  if (t === '') return 0;
  const n = Math.round(Number(t.replace(/[Bb]$/, '')));
  return Number.isFinite(n) ? n : 0;
}

/** Parses `lvs --noheadings --separator '|' -o LVS_FIELDS` output. */
export function parseLvs(stdout: string): LvInfo[] {
  const out: LvInfo[] = [];
  for (const rawLine of stdout.split('\n')) {
    const line = rawLine.trim();
    if (line === '') continue;
    const f = line.split('|').map((x) => x.trim());
    if (f.length < 9) throw new BlocksafeError(`lvs printed a line blocksafe does not understand ("${line}"); check that lvs is LVM2's.`);
    const thin = f[6]!;
    out.push({
      name: f[0]!,
      vg: f[1]!,
      attr: f[2]!,
      size: num(f[3]!),
      pool: f[4]!.replace(/^\[|\]$/g, ''),
      origin: f[5]!.replace(/^\[|\]$/g, ''),
      thinId: /^\d+$/.test(thin) ? Number(thin) : null,
      chunkSize: num(f[7]!),
      path: f[8]!,
    });
  }
  return out;
}

function isNotFound(err: unknown): boolean {
  return err instanceof CommandError && /not found|Failed to find|doesn't exist|does not exist/i.test(err.stderr);
}

function isThin(lv: LvInfo): boolean {
  return lv.attr[0] === 'V' && lv.pool !== '';
}

// ---------------------------------------------------------------------------------------------------------
// The source

export interface LvmSource {
  /** Block device of the snapshot to read (e.g. /dev/VG/snapname). */
  devicePath: string;
  /** Name of the snapshot LV; recorded as the version's snapshot_name. */
  snapshotName: string;
  /** Changed extents since `baseSnapshot` (thin volumes with a kept previous snapshot), else null. */
  hints: Extent[] | null;
  /** The previous snapshot the hints are relative to (its name), or null. */
  baseSnapshot: string | null;
  /**
   * Call once after the backup: classic snapshot -> lvremove; thin -> keep the new snapshot and remove the
   * previous one only when success is true (on failure remove the NEW one and keep the previous). Must be
   * safe to call after errors. Later calls do nothing. Rejects (after trying every step) when a snapshot
   * that should go could not be removed, naming the lvremove command to run by hand.
   */
  finish(success: boolean): Promise<void>;
  /** 'thin' or 'classic'. */
  kind: 'thin' | 'classic';
  /** Size of the snapshot (= the origin volume) in bytes. */
  size: number;
  /** Why hints are null although a previous snapshot was named (for logs), else null. */
  hintsUnavailable: string | null;
}

export interface OpenLvmOptions {
  /** snapshot_name of the newest complete version of the same backup name (thin volumes: the base of the hints). */
  previousSnapshot?: string | null;
  /** Classic snapshots only: lvcreate size, e.g. "5G" or "20%ORIGIN" (default "10%ORIGIN"). */
  snapshotSize?: string;
  run?: CommandRunner;
  /**
   * Reuse this existing blocksafe snapshot instead of creating one (resuming an interrupted backup must
   * read the same snapshot as the interrupted run). NotFoundError when it is gone.
   */
  resumeSnapshot?: string | null;
  /** Non-fatal problems (hints unavailable, a snapshot left active, leftovers of interrupted runs). */
  warn?: (message: string) => void;
  /** Clock for snapshot names (tests). */
  now?: () => Date;
  /** How long to wait for the snapshot's device node to appear (default 10 s). */
  deviceWaitMs?: number;
  /** Pause between lvremove attempts while the device is still busy (default 1000 ms; 3 attempts). */
  removeRetryDelayMs?: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Snapshots `uri` (lvm://VG/LV) and returns the snapshot to read; see LvmSource. */
export async function openLvmSource(uri: string, opts: OpenLvmOptions = {}): Promise<LvmSource> {
  const { vg, lv } = parseLvmUri(uri);
  const run = opts.run ?? defaultCommandRunner;
  const warn = opts.warn ?? ((m: string) => process.stderr.write(`blocksafe: warning: ${m}\n`));
  const retryDelay = opts.removeRetryDelayMs ?? 1000;

  // 1. What is there?
  let rows: LvInfo[];
  try {
    rows = parseLvs((await run('lvs', lvsArgs(vg))).stdout);
  } catch (err) {
    if (isNotFound(err)) throw new NotFoundError(`Volume group "${vg}" was not found (in ${uri}); check the name with \`vgs\`.`);
    throw err;
  }
  const origin = rows.find((r) => r.name === lv);
  if (!origin) throw new NotFoundError(`Logical volume "${vg}/${lv}" was not found; check the name with \`lvs ${vg}\`.`);
  const kind = classify(origin, vg);
  const pool = kind === 'thin' ? rows.find((r) => r.name === origin.pool) : undefined;

  // 2. Snapshot (or reuse the one of an interrupted run).
  let snapName: string;
  let created = false;
  if (opts.resumeSnapshot) {
    snapName = opts.resumeSnapshot;
    const existing = rows.find((r) => r.name === snapName);
    if (!existing || !isBlocksafeSnapshotName(lv, snapName) || existing.origin !== lv) {
      throw new NotFoundError(`The snapshot "${vg}/${snapName}" of the interrupted backup no longer exists; start a new backup instead of resuming.`);
    }
  } else {
    snapName = uniqueName(lv, (opts.now ?? (() => new Date()))(), new Set(rows.map((r) => r.name)));
    const args = ['--snapshot', '--permission', 'r'];
    if (kind === 'thin') args.push('--setactivationskip', 'y');
    else args.push(...snapshotSizeArgs(opts.snapshotSize ?? '10%ORIGIN'));
    args.push('--name', snapName, `${vg}/${lv}`);
    try {
      await run('lvcreate', args);
    } catch (err) {
      if (err instanceof CommandError && !err.missing) {
        const what = kind === 'classic' ? `check the free space of volume group ${vg} (\`vgs ${vg}\`) or choose another --snapshot-size` : `check the thin pool ${vg}/${origin.pool} (\`lvs ${vg}\`)`;
        throw new BlocksafeError(`${err.message.replace(/\.$/, '')} (snapshot of ${vg}/${lv} not created; ${what}).`, undefined, { cause: err });
      }
      throw err;
    }
    created = true;
  }

  const leftovers = rows.filter((r) => r.name !== snapName && r.name !== opts.previousSnapshot && r.origin === lv && isBlocksafeSnapshotName(lv, r.name));
  for (const r of leftovers) {
    warn(`snapshot ${vg}/${r.name} is left over from an earlier blocksafe run; remove it with \`lvremove ${vg}/${r.name}\` if no backup will resume from it.`);
  }

  const removeSnapshot = async (name: string): Promise<void> => {
    for (let attempt = 1; ; attempt++) {
      try {
        await run('lvremove', ['-f', `${vg}/${name}`]);
        return;
      } catch (err) {
        if (isNotFound(err)) return; // already gone
        const busy = err instanceof CommandError && /in use|busy/i.test(err.stderr);
        if (busy && attempt < 3) {
          await sleep(retryDelay);
          continue;
        }
        throw err;
      }
    }
  };

  // 3. Activate, learn where the device is, compute hints. Anything failing here removes what we created.
  let snap: LvInfo;
  let hints: Extent[] | null = null;
  let baseSnapshot: string | null = null;
  let hintsUnavailable: string | null = null;
  try {
    if (kind === 'thin') await run('lvchange', ['--activate', 'y', '--ignoreactivationskip', `${vg}/${snapName}`]);
    const found = parseLvs((await run('lvs', lvsArgs(`${vg}/${snapName}`))).stdout).find((r) => r.name === snapName);
    if (!found) throw new BlocksafeError(`lvs does not list the new snapshot ${vg}/${snapName}; check the volume group with \`lvs ${vg}\`.`);
    snap = found;
    if (!snap.path) snap.path = `/dev/${vg}/${snapName}`;
    await waitForDevice(snap.path, opts.deviceWaitMs ?? 10_000);

    if (kind === 'thin' && opts.previousSnapshot) {
      const prev = rows.find((r) => r.name === opts.previousSnapshot);
      const why = !prev
        ? `the previous snapshot ${vg}/${opts.previousSnapshot} no longer exists`
        : !isThin(prev)
          ? `the previous snapshot ${vg}/${prev.name} is not a thin volume`
          : prev.pool !== origin.pool || prev.origin !== lv
            ? `${vg}/${prev.name} is not a snapshot of ${vg}/${lv} in pool ${origin.pool}`
            : prev.attr[1] !== 'r'
              ? `the previous snapshot ${vg}/${prev.name} is writable, so it may have changed since it was backed up`
              : prev.thinId === null || snap.thinId === null
                ? `lvs reports no thin_id for ${prev.thinId === null ? prev.name : snapName}`
                : !pool || pool.chunkSize <= 0
                  ? `the chunk size of thin pool ${vg}/${origin.pool} is unknown`
                  : null;
      if (why) {
        hintsUnavailable = why;
      } else {
        try {
          hints = await thinHints(run, vg, origin.pool, prev!.thinId!, snap.thinId!, pool!.chunkSize, snap.size, warn);
          baseSnapshot = prev!.name;
        } catch (err) {
          hintsUnavailable = err instanceof Error ? err.message.replace(/\.$/, '') : String(err);
        }
      }
      if (hintsUnavailable) warn(`no change hints for ${vg}/${lv}: ${hintsUnavailable}; this backup reads the whole volume (unchanged blocks are still not stored twice).`);
    }
  } catch (err) {
    if (created) {
      try {
        await removeSnapshot(snapName);
      } catch (cleanupErr) {
        warn(`could not remove the snapshot ${vg}/${snapName} (${(cleanupErr as Error).message}); remove it with \`lvremove ${vg}/${snapName}\`.`);
      }
    }
    throw err;
  }

  let finished = false;
  const finish = async (success: boolean): Promise<void> => {
    if (finished) return;
    finished = true;
    const failures: string[] = [];
    const remove = async (name: string) => {
      try {
        await removeSnapshot(name);
      } catch (err) {
        failures.push(`could not remove the LVM snapshot ${vg}/${name} (${(err as Error).message.replace(/\.$/, '')}); remove it with \`lvremove ${vg}/${name}\``);
      }
    };
    if (kind === 'classic') {
      await remove(snapName);
    } else if (!success) {
      await remove(snapName);
    } else {
      // Keep the new snapshot (the next night's base) but do not leave it active.
      try {
        await run('lvchange', ['--activate', 'n', `${vg}/${snapName}`]);
      } catch (err) {
        warn(`the kept snapshot ${vg}/${snapName} stays active (${(err as Error).message.replace(/\.$/, '')}).`);
      }
      const prevName = opts.previousSnapshot;
      if (prevName && prevName !== snapName) {
        const prev = rows.find((r) => r.name === prevName);
        // Only ever remove a snapshot blocksafe made of this volume.
        if (prev && prev.origin === lv && isThin(prev) && isBlocksafeSnapshotName(lv, prevName)) await remove(prevName);
      }
    }
    if (failures.length > 0) throw new BlocksafeError(`${failures.join('; ')}.`);
  };

  return {
    devicePath: snap.path,
    snapshotName: snapName,
    hints,
    baseSnapshot,
    hintsUnavailable,
    kind,
    size: snap.size || origin.size,
    finish,
  };
}

/**
 * Opens the source, runs `fn` with it, and always finishes it: finish(true) after `fn` resolved,
 * finish(false) after it threw. When both fail, `fn`'s error wins and the cleanup problem goes to `warn`.
 */
export async function withLvmSource<T>(uri: string, opts: OpenLvmOptions, fn: (source: LvmSource) => Promise<T>): Promise<T> {
  const source = await openLvmSource(uri, opts);
  let result: T;
  try {
    result = await fn(source);
  } catch (err) {
    try {
      await source.finish(false);
    } catch (cleanupErr) {
      (opts.warn ?? ((m: string) => process.stderr.write(`blocksafe: warning: ${m}\n`)))((cleanupErr as Error).message);
    }
    throw err;
  }
  await source.finish(true);
  return result;
}

function classify(lv: LvInfo, vg: string): 'thin' | 'classic' {
  const t = lv.attr[0] ?? '-';
  const name = `${vg}/${lv.name}`;
  if (t === 'V' && lv.pool !== '') return 'thin';
  if (t === 's' || t === 'S') throw new RefusedError(`${name} is itself a snapshot; back up its origin volume ${vg}/${lv.origin || '…'} instead.`);
  if (t === 't' || t === 'd') throw new RefusedError(`${name} is a pool, not a volume; back up the volumes in it instead.`);
  if (t === 'O') throw new RefusedError(`${name} is merging a snapshot; wait until \`lvs ${vg}\` shows the merge finished and retry.`);
  if ('pPeiIlL'.includes(t)) throw new RefusedError(`${name} is an internal LVM volume; back up the logical volume that uses it instead.`);
  return 'classic';
}

function uniqueName(lv: string, now: Date, taken: Set<string>): string {
  const base = `${lv}-blocksafe-${stamp(now)}`;
  if (!taken.has(base)) return base;
  for (let i = 2; ; i++) if (!taken.has(`${base}-${i}`)) return `${base}-${i}`;
}

async function waitForDevice(path: string, waitMs: number): Promise<void> {
  const deadline = Date.now() + waitMs;
  for (;;) {
    try {
      await access(path);
      return;
    } catch {
      if (Date.now() >= deadline) {
        throw new BlocksafeError(`The snapshot device ${path} did not appear; check that udev is running (\`udevadm settle\`) and retry.`);
      }
      await sleep(50);
    }
  }
}

/**
 * Changed extents between two thin devices of one pool, from a reserved metadata snapshot of the live pool:
 * reserve_metadata_snap → thin_delta -m → release_metadata_snap (always).
 */
async function thinHints(run: CommandRunner, vg: string, pool: string, prevId: number, newId: number, chunkSize: number, volumeSize: number, warn: (m: string) => void): Promise<Extent[]> {
  const tpool = `${dmName(vg, pool)}-tpool`;
  const tmeta = `/dev/mapper/${dmName(vg, pool)}_tmeta`;
  try {
    await run('dmsetup', ['message', tpool, '0', 'reserve_metadata_snap']);
  } catch (err) {
    if (err instanceof CommandError && err.missing) throw err;
    throw new BlocksafeError(
      `could not reserve a metadata snapshot of thin pool ${vg}/${pool} (${(err as Error).message.replace(/\.$/, '')}); if no other tool holds one, release it with \`dmsetup message ${tpool} 0 release_metadata_snap\``,
    );
  }
  try {
    const parser = new ThinDeltaParser(chunkSize);
    let streamed = false;
    const res = await run('thin_delta', ['-m', '--snap1', String(prevId), '--snap2', String(newId), tmeta], {
      onStdout: (chunk) => {
        streamed = true;
        parser.push(chunk);
      },
    });
    if (!streamed) parser.push(res.stdout);
    const delta = parser.end();
    if (delta.left !== null && delta.left !== prevId) throw new BlocksafeError(`thin_delta compared device ${delta.left} instead of ${prevId}`);
    if (delta.right !== null && delta.right !== newId) throw new BlocksafeError(`thin_delta compared device ${delta.right} instead of ${newId}`);
    return clamp(delta.extents, volumeSize);
  } finally {
    try {
      await run('dmsetup', ['message', tpool, '0', 'release_metadata_snap']);
    } catch (err) {
      warn(`could not release the metadata snapshot of thin pool ${vg}/${pool} (${(err as Error).message.replace(/\.$/, '')}); release it with \`dmsetup message ${tpool} 0 release_metadata_snap\`.`);
    }
  }
}

/** Drops what lies beyond the volume's end (a shrunk volume); 0 = size unknown, keep all. */
function clamp(extents: Extent[], size: number): Extent[] {
  if (size <= 0) return extents;
  const out: Extent[] = [];
  for (const e of extents) {
    if (e.offset >= size) continue;
    out.push(e.offset + e.length > size ? { ...e, length: size - e.offset } : e);
  }
  return out;
}
