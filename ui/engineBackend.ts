/**
 * The real data layer of the terminal UI: the same engine functions the CLI commands call
 * (listVersions, restore, scrub, removeVersion), with the repository opened once for the session.
 */
import { realpathSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlockPipeline } from '../src/engine/blockPipeline.js';
import { blockDeviceSize, deviceNumber, mountsOf } from '../src/engine/device.js';
import type { Progress } from '../src/engine/progress.js';
import { addTags, assertOldEnough, removeTags, setProtected as protectVersion } from '../src/engine/lifecycle.js';
import { describeHolder, LockNames } from '../src/engine/locks.js';
import { imageSpec, parseRbdUri, rbdLabel, type RbdClient } from '../src/engine/rbd.js';
import { restoreToRbd } from '../src/engine/rbdRestore.js';
import { assertRemovable, removeVersion } from '../src/engine/remove.js';
import type { Repository, SecretSource } from '../src/engine/repository.js';
import { restore as runRestore } from '../src/engine/restore.js';
import { scrub as runScrub } from '../src/engine/scrub.js';
import { config, openRepositoryAt, pipelineSettings, rbdClient, repoLocation, secretSource, type GlobalOptions, type PipelineSettings } from '../src/engine/session.js';
import { targetUsers } from '../src/engine/targetInUse.js';
import { listVersions } from '../src/engine/versions.js';
import { describeSystemError, KeyError, StoppedError, UsageError } from '../src/errors.js';
import type { VersionRecord } from '../src/index/records.js';
import {
  CancelledError,
  type MountedVersion,
  errorText,
  type Backend,
  type Connect,
  type RepositorySummary,
  type RestoreOutcome,
  type RestoreRequest,
  type ScrubRequest,
  type TargetInfo,
  type VersionUsage,
} from './backend.js';
import { describeContents } from './contents.js';
import { deviceRefusal, listBlockDevices, type BlockDevice } from './devices.js';
import { mountInChild } from './mountChild.js';
import { confirmName, formatBytes } from './format.js';

/** "~/x" → home, relative → absolute (against the directory the UI was started in). */
export function absoluteTarget(input: string): string {
  const t = input.trim();
  if (t === '~' || t.startsWith('~/')) return path.join(os.homedir(), t.slice(1));
  return path.resolve(t);
}

/**
 * Wraps a progress listener so that a cancelled scrub stops (it only reads: nothing to checkpoint). A restore
 * takes the signal itself and checkpoints when it stops.
 */
function cancellable(onProgress: (p: Progress) => void, signal: AbortSignal): (p: Progress) => void {
  return (p) => {
    if (signal.aborted) throw new CancelledError();
    onProgress(p);
  };
}

class EngineBackend implements Backend {
  readonly summary: RepositorySummary;

  constructor(
    private readonly repo: Repository,
    private readonly settings: PipelineSettings,
    location: string,
    /** rm's guard: versions younger than this many days are not removed ([lifecycle] min_age_days). */
    private readonly minAgeDays: number,
    /** How a `blocksafe mount` child opens the same repository: its options, and the environment with the secret. */
    private readonly child: ChildAccess,
    /** The rbd command with the [ceph] settings, made when an rbd:// target is first typed. */
    private readonly rbd: () => RbdClient,
  ) {
    this.summary = { location, encryption: repo.descriptor.encryption, blockSize: repo.blockSize };
  }

  listVersions(): VersionRecord[] {
    return listVersions(this.repo);
  }

  async versionUsage(v: VersionRecord, signal: AbortSignal): Promise<VersionUsage> {
    const count = v.complete ? Math.ceil(v.size / v.block_size) : v.blocks_done;
    const cursor = this.repo.index.mapCursor(v.id, count);
    // 16 bytes of a 32-byte keyed checksum identify a block well enough for a statistic, at half the memory.
    const seen = new Set<string>();
    const usage: VersionUsage = { blocks: 0, storedBytes: 0, damagedBlocks: 0 };
    for (let i = 0; i < count; i++) {
      if (i % 4096 === 4095) {
        await new Promise((r) => setImmediate(r));
        if (signal.aborted) throw new CancelledError();
      }
      const c = cursor.get(i);
      if (!c) continue;
      const key = c.subarray(0, 16).toString('latin1');
      if (seen.has(key)) continue;
      seen.add(key);
      const record = this.repo.index.getBlock(c);
      usage.blocks++;
      usage.storedBytes += record?.stored ?? 0;
      if (!record || !record.valid) usage.damagedBlocks++;
    }
    return usage;
  }

  listDevices(): BlockDevice[] {
    return listBlockDevices();
  }

  /** The target lock held live means a restore to it runs right now (another window, a script). */
  private runningRefusal(key: string, shown: string): string | null {
    const running = this.repo.locks.liveLocks((r) => r === LockNames.target(key));
    return running[0] ? `${shown} is being restored right now by ${describeHolder(running[0])}; wait for it to finish or stop it there.` : null;
  }

  /** An rbd:// target: the same refusals as `restore` (the engine checks again when the restore starts). */
  private async inspectRbd(input: string): Promise<TargetInfo> {
    const uri = input.trim();
    const info: TargetInfo = { path: uri, name: uri, kind: 'new-rbd', size: 0, mountpoints: [], refusal: null, overwrites: false, warning: null, interrupted: null, description: '' };
    try {
      const spec = parseRbdUri(uri, { snapshot: 'forbidden' });
      const key = rbdLabel(spec);
      info.path = key;
      info.name = spec.image;
      info.refusal = this.runningRefusal(key, key);
      if (info.refusal) return info;
      info.interrupted = this.repo.index.getRestoreState(key) ?? null;
      const client = this.rbd();
      const image = await client.info(spec, null);
      if (!image) {
        info.description = `a new RBD image in pool ${spec.pool}${spec.namespace ? `, namespace ${spec.namespace}` : ''}`;
        return info;
      }
      const watchers = await client.watchers(spec);
      if (watchers.length) {
        info.kind = 'rbd';
        info.refusal = `RBD image ${imageSpec(spec, null)} is in use (watched by ${watchers.join(', ')}: a VM or a mapping has it open); it cannot be restored to, not even with a typed confirmation. Nothing was written.`;
        return info;
      }
      info.kind = 'rbd';
      info.size = image.size;
      info.overwrites = true;
      info.description = `an existing RBD image of ${formatBytes(image.size)}`;
    } catch (err) {
      info.refusal = errorText(err);
    }
    return info;
  }

  async inspectTarget(input: string, v: VersionRecord): Promise<TargetInfo> {
    if (input.trim().startsWith('rbd://')) return this.inspectRbd(input);
    const abs = absoluteTarget(input);
    const info: TargetInfo = {
      path: abs,
      name: confirmName(abs),
      kind: 'other',
      size: 0,
      mountpoints: [],
      refusal: null,
      overwrites: false,
      warning: null,
      interrupted: null,
      description: '',
    };
    let real = abs;
    try {
      real = await fs.realpath(abs);
    } catch {
      // a new file: the engine keys its restore state by the resolved path as well
    }
    // A restore state whose target lock is held live is a restore running right now (another window, a
    // script), not an interrupted one: it is neither resumed nor overwritten from here.
    info.refusal = this.runningRefusal(real, abs);
    if (info.refusal) return info;
    info.interrupted = this.repo.index.getRestoreState(real) ?? null;
    let st;
    try {
      st = await fs.stat(abs);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        info.refusal = describeSystemError(err, abs).message;
        return info;
      }
    }
    if (!st) {
      info.kind = 'new-file';
      const dir = path.dirname(abs);
      let dirSt;
      try {
        dirSt = await fs.stat(dir);
      } catch {
        info.refusal = `The folder ${dir} does not exist; create it first or choose another path.`;
        return info;
      }
      if (!dirSt.isDirectory()) {
        info.refusal = `${dir} is not a folder.`;
        return info;
      }
      info.description = `a new file in ${dir}`;
      try {
        const fsStat = await fs.statfs(dir);
        const free = fsStat.bavail * fsStat.bsize;
        if (free < v.size) info.warning = `Only ${formatBytes(free)} free in ${dir}, the version is ${formatBytes(v.size)} (zero blocks become holes, so it may still fit).`;
      } catch {
        // no free-space figure: not a reason to refuse
      }
      return info;
    }
    if (st.isDirectory()) {
      info.kind = 'directory';
      info.refusal = `${abs} is a folder; add a file name, e.g. ${path.join(abs, `${v.name}.img`)}`;
      return info;
    }
    // Something using the target (a mounted loop device's backing file, a held or mounted disk, swap, a
    // running VM) is refused here already; the engine checks again when the restore starts.
    if (st.isFile() || st.isBlockDevice()) {
      const users = await targetUsers(st);
      if (users.length) {
        info.kind = st.isFile() ? 'file' : 'block';
        info.refusal = `${abs} cannot be used: ${users.join('; ')}. Nothing was written.`;
        return info;
      }
    }
    if (st.isFile()) {
      info.kind = 'file';
      info.size = st.size;
      info.overwrites = st.size > 0;
      info.description = st.size > 0 ? `an existing file of ${formatBytes(st.size)}` : 'an existing empty file';
      if (st.size > 0) info.contents = await describeContents(abs, st.size);
      return info;
    }
    if (st.isBlockDevice()) {
      info.kind = 'block';
      info.overwrites = true;
      try {
        info.size = blockDeviceSize(st.rdev);
      } catch (err) {
        info.refusal = (err as Error).message;
        return info;
      }
      info.mountpoints = mountsOf(st.rdev);
      const dev = listBlockDevices().find((d) => d.devno === deviceNumber(st.rdev));
      if (dev) {
        info.name = dev.name;
        info.description = [dev.model, `block device ${dev.name}`].filter(Boolean).join(', ');
        info.refusal = deviceRefusal({ ...dev, mountpoints: info.mountpoints }, v.size);
      } else {
        info.description = 'block device';
        if (info.mountpoints.length) info.refusal = `mounted on ${info.mountpoints.join(', ')}`;
        else if (info.size < v.size) info.refusal = `too small (${formatBytes(info.size)} < ${formatBytes(v.size)})`;
      }
      if (info.refusal) info.refusal = `${abs} cannot be used: ${info.refusal}.`;
      else info.contents = await describeContents(abs, info.size);
      return info;
    }
    info.refusal = `${abs} is neither a regular file nor a block device.`;
    return info;
  }

  private pipeline(): Promise<BlockPipeline> {
    return BlockPipeline.start(this.repo, this.settings.threads, { storeRead: this.settings.readThrottle, storeWrite: this.settings.writeThrottle });
  }

  async restore(v: VersionRecord, req: RestoreRequest, onProgress: (p: Progress) => void, signal: AbortSignal): Promise<RestoreOutcome> {
    const pipeline = await this.pipeline();
    try {
      const options = {
        target: req.target,
        force: req.force,
        resume: req.resume,
        fillFrom: req.fillFrom ? (this.repo.index.getVersion(req.fillFrom) ?? undefined) : undefined,
        sparse: false,
        queueDepth: this.settings.queueDepth,
        writeThrottle: this.settings.writeThrottle,
        onProgress,
        signal,
      };
      // The RBD restore has no fill; refused rather than silently writing zeros (the wizard does not offer it).
      if (req.target.startsWith('rbd://') && options.fillFrom) throw new UsageError('Damaged blocks of an RBD restore cannot be filled from another version; they are written as zeros.');
      const r = req.target.startsWith('rbd://') ? await restoreToRbd(this.repo, pipeline, this.rbd(), v, options) : await runRestore(this.repo, pipeline, v, options);
      return { bytesWritten: r.bytesWritten, damaged: r.damaged };
    } catch (err) {
      if (err instanceof StoppedError) throw new CancelledError(this.checkpointOf(req.target));
      throw err;
    } finally {
      await pipeline.close();
    }
  }

  /** Blocks of the interrupted restore to `target` that are on disk (its checkpoint): where a resume starts. */
  private checkpointOf(target: string): number | undefined {
    if (target.startsWith('rbd://')) return this.repo.index.getRestoreState(target)?.blocks_done;
    let real = target;
    try {
      real = realpathSync(target);
    } catch {
      // gone meanwhile: the state is keyed by the path then
    }
    return this.repo.index.getRestoreState(real)?.blocks_done;
  }

  scrub = async (req: ScrubRequest, onProgress: (p: Progress) => void, signal: AbortSignal) => {
    const pipeline = await this.pipeline();
    try {
      return await runScrub(this.repo, pipeline, {
        versions: req.versions,
        percent: req.percent,
        queueDepth: this.settings.queueDepth,
        direct: this.settings.direct,
        onProgress: cancellable(onProgress, signal),
      });
    } finally {
      await pipeline.close();
    }
  };

  removalRefusal = (v: VersionRecord): string | null => {
    try {
      const current = this.repo.index.getVersion(v.id) ?? v;
      assertRemovable(current);
      assertOldEnough(current, this.minAgeDays, false);
      return null;
    } catch (err) {
      return errorText(err);
    }
  };

  /** The same checks as "blocksafe rm" without --force: the UI never forces a removal. */
  remove = async (v: VersionRecord) => {
    const current = this.repo.index.getVersion(v.id) ?? v;
    assertRemovable(current);
    assertOldEnough(current, this.minAgeDays, false);
    await removeVersion(this.repo, current);
  };

  setProtected = async (v: VersionRecord, on: boolean) => {
    await protectVersion(this.repo, v.id, on);
  };

  addTag = async (v: VersionRecord, tag: string) => {
    await addTags(this.repo, v.id, [tag]);
  };

  removeTag = async (v: VersionRecord, tag: string) => {
    await removeTags(this.repo, v.id, [tag]);
  };

  private readonly mounts = new Set<MountedVersion>();

  mount = async (v: VersionRecord) => {
    const m = await mountInChild(v.id, this.child.args, this.child.env);
    this.mounts.add(m);
    void m.ended.then(() => this.mounts.delete(m));
    return m;
  };

  async close(): Promise<void> {
    // The screens unmount before the UI quits; this is the safety net for an end they did not see.
    await Promise.all([...this.mounts].map((m) => m.unmount().catch(() => undefined)));
    await this.repo.close();
  }
}

interface ChildAccess {
  args: string[];
  env: NodeJS.ProcessEnv;
}

/**
 * The repository options for a child blocksafe. A passphrase typed into the UI goes to it in its environment
 * (BLOCKSAFE_PASSPHRASE, readable only by the same user), never on its command line.
 */
function childAccess(opts: GlobalOptions, location: string, typedPassphrase: string | null): ChildAccess {
  const args = ['--repo', location];
  if (opts.config) args.push('--config', path.resolve(opts.config));
  if (opts.keyFile) args.push('--key-file', path.resolve(opts.keyFile));
  else if (opts.passphraseFile) args.push('--passphrase-file', path.resolve(opts.passphraseFile));
  const env = { ...process.env };
  if (typedPassphrase !== null) env.BLOCKSAFE_PASSPHRASE = typedPassphrase;
  return { args, env };
}

/** How the UI opens the repository named by the global options; a passphrase is asked inside the UI. */
export function engineConnect(opts: GlobalOptions): { location: string; connect: Connect } {
  const given = repoLocation(opts);
  const location = /^[a-z0-9]+:\/\//i.test(given) ? given : path.resolve(given);
  const settings = pipelineSettings(opts);
  const minAgeDays = config(opts).config.lifecycle.min_age_days;
  let client: RbdClient | undefined;
  const rbd = () => (client ??= rbdClient(opts));
  let askInUi = !opts.keyFile && !opts.passphraseFile && process.env.BLOCKSAFE_PASSPHRASE === undefined;
  const connect: Connect = async (askPassphrase) => {
    // A wrong passphrase in BLOCKSAFE_PASSPHRASE is not the end of the restore day: ask for it instead.
    if (!askInUi && !opts.keyFile && !opts.passphraseFile) {
      try {
        const repo = await openRepositoryAt(opts, location, secretSource(opts), true);
        return new EngineBackend(repo, settings, location, minAgeDays, childAccess(opts, location, null), rbd);
      } catch (err) {
        if (!(err instanceof KeyError)) throw err;
        askInUi = true;
      }
    }
    // The passphrase that opened the repository (the last one typed), for the mount child.
    let typed: string | null = null;
    const secret: SecretSource = askInUi
      ? async () => {
          const pass = await askPassphrase();
          if (pass.length === 0) throw new UsageError('The passphrase is empty.');
          typed = pass;
          return { type: 'passphrase', value: Buffer.from(pass, 'utf8') };
        }
      : secretSource(opts);
    const repo = await openRepositoryAt(opts, location, secret, true);
    return new EngineBackend(repo, settings, location, minAgeDays, childAccess(opts, location, typed), rbd);
  };
  return { location, connect };
}
