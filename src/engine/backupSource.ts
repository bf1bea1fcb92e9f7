import { NotFoundError, UsageError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { backup, newestComplete, newestIncomplete, type BackupOptions } from './backup.js';
import type { BlockPipeline } from './blockPipeline.js';
import { withLvmSource } from './lvm.js';
import type { RbdClient } from './rbd.js';
import { backupRbd } from './rbdBackup.js';
import type { Repository } from './repository.js';

export interface SourceBackupOptions extends Omit<BackupOptions, 'sourceLabel' | 'resume'> {
  /** A path, file:// URI, or lvm://VG/LV (snapshotted for the backup). */
  source: string;
  resume: boolean;
  /** Classic LVM snapshots: lvcreate size ([lvm] snapshot_size). */
  snapshotSize?: string;
  /** How rbd:// sources are reached ([ceph] settings). */
  rbd?: () => RbdClient;
  /** Notes a user should see (a full read instead of a diff, snapshots kept). */
  warn?: (message: string) => void;
}

/**
 * Backs up any source the command line accepts. rbd://POOL/IMAGE[@SNAP]: see rbdBackup.ts. lvm://VG/LV: snapshot, back up the snapshot, remove it
 * (thin volumes: keep it as the base of the next backup's thin_delta hints); a resumed backup reads the
 * snapshot of the interrupted run.
 */
export async function backupSource(repo: Repository, pipeline: BlockPipeline, opts: SourceBackupOptions): Promise<VersionRecord> {
  const { snapshotSize, rbd, warn, ...rest } = opts;
  if (opts.source.startsWith('rbd://')) {
    // RBD: export-diff of a snapshot (made and rotated by blocksafe unless the URI names one).
    if (opts.snapshotName) throw new UsageError('--snapshot-name cannot be used with rbd:// sources: the snapshot is the one read (rbd://POOL/IMAGE@SNAP) or the one blocksafe makes.');
    if (opts.hints) throw new UsageError('--hints cannot be used with rbd:// sources: rbd export-diff says what changed.');
    if (opts.from) throw new UsageError('--from cannot be used with rbd:// sources: the base is the version read from the previous snapshot.');
    if (!rbd) throw new UsageError('rbd:// sources are not available here.');
    return backupRbd(repo, pipeline, rbd(), { ...rest, uri: opts.source, warn: warn ?? (() => undefined) });
  }
  if (!opts.source.startsWith('lvm://')) return backup(repo, pipeline, rest);
  if (opts.snapshotName) throw new UsageError('--snapshot-name cannot be used with lvm:// sources: blocksafe names the snapshot it creates.');
  if (opts.hints) throw new UsageError('--hints cannot be used with lvm:// sources: thin volumes get their hints from thin_delta.');
  const previous = newestComplete(repo, opts.name);
  const interrupted = opts.resume ? newestIncomplete(repo, opts.name) : null;
  if (opts.resume && !interrupted) throw new NotFoundError(`There is no interrupted backup of "${opts.name}" to resume; run the backup without --resume.`);
  return withLvmSource(opts.source, { previousSnapshot: previous?.snapshot_name || null, snapshotSize, resumeSnapshot: interrupted?.snapshot_name || null }, (src) => {
    // thin_delta hints are relative to the kept snapshot: only valid against the version taken from it.
    const base = src.hints ? baseBySnapshot(repo, opts.name, src.baseSnapshot) : null;
    return backup(repo, pipeline, {
      ...rest,
      source: src.devicePath,
      sourceLabel: opts.source,
      snapshotName: src.snapshotName,
      from: base ?? opts.from,
      hints: base ? src.hints : null,
      resume: !!interrupted,
      offerResume: undefined,
    });
  });
}

/** The newest complete version of `name` taken from the given snapshot. */
function baseBySnapshot(repo: Repository, name: string, snapshot: string | null): VersionRecord | null {
  if (!snapshot) return null;
  let best: VersionRecord | null = null;
  for (const v of repo.index.allVersions()) if (v.name === name && v.complete && v.snapshot_name === snapshot && (!best || v.date > best.date)) best = v;
  return best;
}
