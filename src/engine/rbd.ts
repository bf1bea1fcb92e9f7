/**
 * Ceph RBD images through the `rbd` command (ceph-common, present on every Ceph host): URIs, image and
 * snapshot queries, and the two data streams — `rbd export-diff … -` (reading) and `rbd import-diff - …`
 * (writing). Why the CLI and not librbd bindings or krbd/rbd-nbd: see docs/RBD.md.
 *
 * Every command gets the [ceph] settings as arguments (config file, keyring, client id, cluster, a connect
 * timeout) and the environment without blocksafe's secrets; CEPH_CONF / CEPH_ARGS pass through to rbd.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { BlocksafeError, NotFoundError, RefusedError, UsageError } from '../errors.js';
import { childEnvironment } from '../util/secrets.js';
import { CommandError, createCommandRunner, type CommandRunner } from './lvm.js';

export interface CephSettings {
  /** ceph.conf path ('' = CEPH_CONF, else /etc/ceph/ceph.conf: rbd's own default). */
  conf: string;
  keyring: string;
  /** Client id, e.g. "backup" for client.backup ('' = rbd's default, admin). */
  id: string;
  cluster: string;
  /** Seconds to wait for the monitors before giving up (client_mount_timeout). */
  timeoutSeconds: number;
}

export const DEFAULT_CEPH: CephSettings = { conf: '', keyring: '', id: '', cluster: '', timeoutSeconds: 30 };

export function cephArgs(s: CephSettings): string[] {
  const a: string[] = [];
  if (s.cluster) a.push('--cluster', s.cluster);
  if (s.conf) a.push('--conf', s.conf);
  if (s.keyring) a.push('--keyring', s.keyring);
  if (s.id) a.push('--id', s.id);
  a.push('--client_mount_timeout', String(Math.max(1, Math.round(s.timeoutSeconds))));
  return a;
}

// ---------------------------------------------------------------------------------------------------------
// URIs

export interface RbdSpec {
  pool: string;
  namespace: string | null;
  image: string;
  snap: string | null;
}

/** Pool, namespace, image and snapshot names blocksafe accepts (Ceph allows more; these are safe as arguments). */
const NAME = /^[A-Za-z0-9_.+][A-Za-z0-9_.+-]{0,254}$/;
const EXAMPLE = 'write it as rbd://POOL/IMAGE[@SNAPSHOT] or rbd://POOL/NAMESPACE/IMAGE[@SNAPSHOT], e.g. rbd://rbd/vm-101-disk-0';

/** `rbd://POOL/[NS/]IMAGE[@SNAP]` → parts; anything else is a UsageError. */
export function parseRbdUri(uri: string, opts: { snapshot: 'allowed' | 'forbidden' } = { snapshot: 'allowed' }): RbdSpec {
  const m = /^rbd:\/\/([^/@]+)\/(?:([^/@]+)\/)?([^/@]+)(?:@([^/@]+))?$/.exec(uri);
  if (!m) throw new UsageError(`"${uri}" is not an RBD image; ${EXAMPLE}.`);
  const [, pool, namespace, image, snap] = m;
  for (const [what, v] of [
    ['pool', pool],
    ['namespace', namespace],
    ['image', image],
    ['snapshot', snap],
  ] as const) {
    if (v !== undefined && (!NAME.test(v) || v === '.' || v === '..')) throw new UsageError(`"${uri}" does not name a valid ${what} ("${v}"); ${EXAMPLE}.`);
  }
  if (snap !== undefined && opts.snapshot === 'forbidden') throw new UsageError(`"${uri}" names a snapshot; restore to an image (rbd://POOL/IMAGE), snapshots are read-only.`);
  return { pool: pool!, namespace: namespace ?? null, image: image!, snap: snap ?? null };
}

/** `pool/[ns/]image[@snap]` as rbd takes it. */
export function imageSpec(s: RbdSpec, snap: string | null = s.snap): string {
  return `${s.pool}/${s.namespace ? `${s.namespace}/` : ''}${s.image}${snap ? `@${snap}` : ''}`;
}

/** The URI without a snapshot (what versions record as their source). */
export function rbdLabel(s: RbdSpec): string {
  return `rbd://${imageSpec(s, null)}`;
}

/** Snapshots blocksafe makes: `blocksafe-<version id>`. */
export function isBlocksafeSnapshot(name: string): boolean {
  return /^blocksafe-[a-z0-9]{1,64}$/.test(name);
}

// ---------------------------------------------------------------------------------------------------------
// Errors

/** rbd's own message line ("rbd: error opening image x: (2) No such file or directory"); Ceph's log lines are skipped. */
function rbdLine(stderr: string): string {
  const lines = stderr.split('\n').map((l) => l.trim());
  const own = lines.filter((l) => /^rbd: /.test(l));
  if (own.length > 0) return own[own.length - 1]!.replace(/^rbd: /, '');
  const rest = lines.filter((l) => l !== '' && !/^\d{4}-\d\d-\d\dT/.test(l) && !/% complete/.test(l));
  return rest[rest.length - 1] ?? '';
}

/** One clear line for a failed rbd command about `spec`. */
export function rbdError(err: unknown, spec: RbdSpec, s: CephSettings): BlocksafeError {
  if (!(err instanceof CommandError)) return err instanceof BlocksafeError ? err : new BlocksafeError(String(err));
  if (err.missing) return new BlocksafeError('rbd was not found on PATH; install ceph-common (e.g. apt-get install ceph-common) to use rbd:// volumes.');
  const line = rbdLine(err.stderr) || err.message;
  const stderr = err.stderr;
  if (/couldn't connect to the cluster|\(110\) Connection timed out|authenticate timed out/.test(stderr)) {
    return new BlocksafeError(
      `The Ceph cluster is unreachable (no monitor answered within ${s.timeoutSeconds} s; config ${s.conf || process.env.CEPH_CONF || '/etc/ceph/ceph.conf'}); check [ceph] in appliance.conf and \`ceph -s\`.`,
    );
  }
  if (/error opening pool|pool .* does not exist/i.test(stderr)) return new NotFoundError(`Ceph pool "${spec.pool}" does not exist; check the name with \`ceph osd pool ls\`.`);
  if (/namespace .*does not exist/i.test(line) || (/namespace/i.test(line) && /\(2\) No such file/.test(line)))
    return new NotFoundError(`RBD namespace "${spec.pool}/${spec.namespace}" does not exist; check it with \`rbd namespace ls ${spec.pool}\`.`);
  if (/error opening image|image .*does not exist|\(2\) No such file or directory/.test(line)) {
    return new NotFoundError(`RBD image "${imageSpec(spec, null)}" does not exist; check the name with \`rbd ls ${spec.pool}${spec.namespace ? `/${spec.namespace}` : ''}\`.`);
  }
  if (/\(1\) Operation not permitted|\(13\) Permission denied/.test(stderr)) {
    return new BlocksafeError(
      `Ceph refused access to ${imageSpec(spec, null)} (permission denied for client ${s.id || 'admin'}); check the client's caps (\`ceph auth get client.${s.id || 'admin'}\`) and keyring.`,
    );
  }
  return new BlocksafeError(`rbd failed on ${imageSpec(spec, null)}: ${line}`.replace(/\.?$/, '.'));
}

// ---------------------------------------------------------------------------------------------------------
// The client

export interface ImageInfo {
  size: number;
  objectSize: number;
}
export interface SnapInfo {
  id: number;
  name: string;
  protected: boolean;
}

/** A running `rbd export-diff`: its stdout as chunks, and its exit. */
export interface ExportStream {
  chunks: AsyncIterator<Buffer>;
  /** Resolves when rbd exited 0; rejects with rbd's error otherwise. */
  done: Promise<void>;
  kill(): void;
  /**
   * Ends the stream after reading it failed. When the stream broke off (`broken`: rbd failed), rbd's own
   * error says why: it is waited for (it has exited, or exits soon) and thrown in place of the caller's.
   */
  abandon(broken: boolean): Promise<void>;
}

/** A running `rbd import-diff -`: write the stream, then end(). */
export interface ImportStream {
  write(b: Buffer): Promise<void>;
  /** Ends stdin and waits for rbd to exit 0 (the data is then in the cluster). */
  end(): Promise<void>;
  kill(): void;
}

export class RbdClient {
  private readonly run: CommandRunner;
  private readonly env: NodeJS.ProcessEnv;

  constructor(
    readonly settings: CephSettings,
    opts: { run?: CommandRunner; env?: NodeJS.ProcessEnv } = {},
  ) {
    this.env = childEnvironment(opts.env ?? process.env);
    this.run = opts.run ?? createCommandRunner({ env: this.env });
  }

  private async rbd(spec: RbdSpec, args: string[]): Promise<string> {
    try {
      return (await this.run('rbd', [...cephArgs(this.settings), ...args])).stdout;
    } catch (err) {
      throw rbdError(err, spec, this.settings);
    }
  }

  private json<T>(text: string, what: string): T {
    try {
      return JSON.parse(text) as T;
    } catch {
      throw new BlocksafeError(`rbd printed ${what} blocksafe does not understand; check that rbd is Ceph's (ceph-common).`);
    }
  }

  /** Size of the image (or snapshot), or null when the image does not exist (the pool must). */
  async info(spec: RbdSpec, snap: string | null = spec.snap): Promise<ImageInfo | null> {
    let out: string;
    try {
      out = await this.rbd(spec, ['info', '--format', 'json', imageSpec(spec, snap)]);
    } catch (err) {
      if (err instanceof NotFoundError && /^RBD image/.test(err.message)) {
        if (snap) throw new NotFoundError(`RBD snapshot "${imageSpec(spec, snap)}" does not exist (or its image does not); check with \`rbd snap ls ${imageSpec(spec, null)}\`.`);
        return null;
      }
      throw err;
    }
    const j = this.json<{ size?: unknown; object_size?: unknown }>(out, 'image information');
    if (typeof j.size !== 'number' || !Number.isSafeInteger(j.size) || j.size < 0) throw new BlocksafeError(`rbd reported no usable size for ${imageSpec(spec, snap)}.`);
    return { size: j.size, objectSize: typeof j.object_size === 'number' ? j.object_size : 0 };
  }

  async snapshots(spec: RbdSpec): Promise<SnapInfo[]> {
    const rows = this.json<unknown[]>(await this.rbd(spec, ['snap', 'ls', '--format', 'json', imageSpec(spec, null)]), 'a snapshot list');
    if (!Array.isArray(rows)) throw new BlocksafeError('rbd snap ls printed no list.');
    return rows.map((r) => {
      const o = r as Record<string, unknown>;
      return { id: Number(o.id), name: String(o.name), protected: o.protected === true || o.protected === 'true' };
    });
  }

  async createSnapshot(spec: RbdSpec, name: string): Promise<void> {
    await this.rbd(spec, ['snap', 'create', '--no-progress', imageSpec(spec, name)]);
  }

  async removeSnapshot(spec: RbdSpec, name: string): Promise<void> {
    await this.rbd(spec, ['snap', 'rm', '--no-progress', imageSpec(spec, name)]);
  }

  /** Number of clones of a snapshot. */
  async children(spec: RbdSpec, snap: string): Promise<number> {
    const rows = this.json<unknown[]>(await this.rbd(spec, ['children', '--format', 'json', imageSpec(spec, snap)]), 'a list of clones');
    return Array.isArray(rows) ? rows.length : 0;
  }

  /** Addresses of the clients watching the image (a VM that has it open). */
  async watchers(spec: RbdSpec): Promise<string[]> {
    const j = this.json<{ watchers?: unknown }>(await this.rbd(spec, ['status', '--format', 'json', imageSpec(spec, null)]), 'an image status');
    if (!Array.isArray(j.watchers)) return [];
    return j.watchers.map((w) => String((w as Record<string, unknown>).address ?? 'unknown'));
  }

  async create(spec: RbdSpec, size: number): Promise<void> {
    await this.rbd(spec, ['create', '--size', `${size}B`, imageSpec(spec, null)]);
  }

  async resize(spec: RbdSpec, size: number): Promise<void> {
    await this.rbd(spec, ['resize', '--no-progress', '--allow-shrink', '--size', `${size}B`, imageSpec(spec, null)]);
  }

  private spawnRbd(spec: RbdSpec, args: string[], stdin: 'pipe' | 'ignore'): { child: ChildProcess; done: Promise<void> } {
    const child = spawn('rbd', [...cephArgs(this.settings), ...args], { env: this.env, stdio: [stdin, stdin === 'pipe' ? 'ignore' : 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (c: string) => {
      stderr += c;
      if (stderr.length > 128 * 1024) stderr = stderr.slice(-64 * 1024);
    });
    const done = new Promise<void>((resolve, reject) => {
      child.on('error', (err) => {
        const e = err as NodeJS.ErrnoException;
        reject(rbdError(new CommandError(`rbd failed: ${e.message}`, 'rbd', '', null, e.code === 'ENOENT'), spec, this.settings));
      });
      child.on('close', (code, signal) => {
        if (code === 0) resolve();
        else reject(rbdError(new CommandError(`rbd failed: ${signal ? `killed by ${signal}` : `exit status ${code}`}`, 'rbd', stderr, code, false), spec, this.settings));
      });
    });
    done.catch(() => undefined);
    return { child, done };
  }

  /** `rbd export-diff [--from-snap FROM] SPEC@SNAP -`: the allocated (or changed) extents of a snapshot. */
  exportDiff(spec: RbdSpec, snap: string | null, fromSnap: string | null): ExportStream {
    const args = ['export-diff', '--no-progress'];
    if (fromSnap) args.push('--from-snap', fromSnap);
    args.push(imageSpec(spec, snap), '-');
    const { child, done } = this.spawnRbd(spec, args, 'ignore');
    const kill = () => child.kill('SIGKILL');
    const abandon = async (broken: boolean) => {
      try {
        if (broken) await Promise.race([done, new Promise((r) => setTimeout(r, 5000).unref())]);
      } finally {
        kill();
      }
    };
    return { chunks: child.stdout![Symbol.asyncIterator]() as AsyncIterator<Buffer>, done, kill, abandon };
  }

  /** `rbd import-diff - SPEC`: writes a diff stream into an existing image. */
  importDiff(spec: RbdSpec): ImportStream {
    const { child, done } = this.spawnRbd(spec, ['import-diff', '--no-progress', '-', imageSpec(spec, null)], 'pipe');
    const stdin = child.stdin!;
    let broken: Error | null = null;
    stdin.on('error', (err) => {
      broken = err;
    });
    return {
      write: async (b) => {
        if (broken) return done; // rbd went away: its exit says why
        if (!stdin.write(b)) {
          await new Promise<void>((resolve) => {
            const onDone = () => {
              stdin.off('drain', onDone);
              stdin.off('close', onDone);
              resolve();
            };
            stdin.on('drain', onDone);
            stdin.on('close', onDone);
          });
        }
      },
      end: async () => {
        stdin.end();
        await done;
      },
      kill: () => child.kill('SIGKILL'),
    };
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backup sources: snapshot, rotation

export interface RbdSource {
  spec: RbdSpec;
  /** The snapshot to read. */
  snapshot: string;
  size: number;
  /** The previous snapshot still present, to diff from (null: read everything). */
  fromSnap: string | null;
  /** Why there is no fromSnap although a previous snapshot was named, else null. */
  fromUnavailable: string | null;
  /** After the backup: on success, remove older blocksafe snapshots of this image (auto mode). Safe to call twice. */
  finish(success: boolean): Promise<void>;
}

export interface OpenRbdOptions {
  /** snapshot_name of the newest complete version of the backup name. */
  previousSnapshot: string | null;
  /** Read this blocksafe snapshot again (a resumed backup), instead of making one. */
  resumeSnapshot: string | null;
  /** Id of the version being made: the snapshot is called blocksafe-<id>. */
  versionId: string;
  /**
   * Whether an older blocksafe-* snapshot belongs to this backup chain (true) and may go, or why not. Another
   * repository or name backing up the same image has its own: removing them would break its next diff, or
   * its backup in progress.
   */
  ownSnapshot: (name: string) => true | string;
  warn: (message: string) => void;
}

/**
 * `rbd://POOL/IMAGE@SNAP` reads the user's snapshot and leaves snapshots alone. `rbd://POOL/IMAGE` snapshots
 * the image as blocksafe-<version id>; after a successful backup that snapshot is kept as the base of the
 * next diff and older blocksafe-* snapshots of the same backup chain (ownSnapshot) are removed — never a
 * snapshot blocksafe did not name, nor one of another repository or name, nor one that is protected or has
 * clones. After a failed backup the new snapshot stays, so that
 * `backup --resume` reads the same data; the next successful backup removes it.
 */
export async function openRbdSource(client: RbdClient, spec: RbdSpec, opts: OpenRbdOptions): Promise<RbdSource> {
  const head = await client.info(spec, null);
  if (!head) throw new NotFoundError(`RBD image "${imageSpec(spec, null)}" does not exist; check the name with \`rbd ls ${spec.pool}\`.`);
  let snaps = await client.snapshots(spec);
  const has = (n: string | null) => !!n && snaps.some((s) => s.name === n);
  let snapshot: string;
  const auto = spec.snap === null;
  if (!auto) {
    snapshot = spec.snap!;
    if (!has(snapshot)) throw new NotFoundError(`RBD snapshot "${imageSpec(spec)}" does not exist; check with \`rbd snap ls ${imageSpec(spec, null)}\`.`);
  } else if (opts.resumeSnapshot) {
    snapshot = opts.resumeSnapshot;
    if (!has(snapshot)) throw new NotFoundError(`The snapshot ${imageSpec(spec, snapshot)} of the interrupted backup no longer exists; start a new backup instead of resuming.`);
  } else {
    snapshot = `blocksafe-${opts.versionId}`;
    if (has(snapshot)) throw new RefusedError(`The snapshot ${imageSpec(spec, snapshot)} exists already; remove it or retry.`);
    await client.createSnapshot(spec, snapshot);
    snaps = await client.snapshots(spec);
  }
  const info = await client.info(spec, snapshot);
  let fromSnap: string | null = null;
  let fromUnavailable: string | null = null;
  const prev = opts.previousSnapshot;
  if (prev && prev !== snapshot) {
    const p = snaps.find((x) => x.name === prev);
    const cur = snaps.find((x) => x.name === snapshot);
    if (p && cur && p.id < cur.id) fromSnap = prev;
    else if (p) fromUnavailable = `the previous snapshot ${imageSpec(spec, prev)} is not older than ${snapshot}`;
    else fromUnavailable = `the previous snapshot ${imageSpec(spec, prev)} no longer exists`;
  }

  let finished = false;
  const finish = async (success: boolean): Promise<void> => {
    if (finished || !auto || !success) return;
    finished = true;
    const current = await client.snapshots(spec);
    const problems: string[] = [];
    for (const s of current) {
      if (s.name === snapshot || !isBlocksafeSnapshot(s.name)) continue;
      const mine = opts.ownSnapshot(s.name);
      if (mine !== true) {
        opts.warn(`kept the snapshot ${imageSpec(spec, s.name)}: ${mine}; remove it with \`rbd snap rm ${imageSpec(spec, s.name)}\` if nothing needs it.`);
        continue;
      }
      if (s.protected) {
        opts.warn(`the old snapshot ${imageSpec(spec, s.name)} is protected, so blocksafe keeps it; unprotect it (\`rbd snap unprotect\`) if nothing needs it.`);
        continue;
      }
      try {
        if ((await client.children(spec, s.name)) > 0) {
          opts.warn(`the old snapshot ${imageSpec(spec, s.name)} has clones, so blocksafe keeps it.`);
          continue;
        }
        await client.removeSnapshot(spec, s.name);
      } catch (err) {
        problems.push(`could not remove the old snapshot ${imageSpec(spec, s.name)} (${(err as Error).message.replace(/\.$/, '')}); remove it with \`rbd snap rm ${imageSpec(spec, s.name)}\``);
      }
    }
    if (problems.length > 0) throw new BlocksafeError(`${problems.join('; ')}.`);
  };
  return { spec, snapshot, size: info!.size, fromSnap, fromUnavailable, finish };
}
