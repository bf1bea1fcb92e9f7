/**
 * What the terminal UI needs from the engine, as one small interface. The real implementation
 * (engineBackend.ts) calls the engine; component tests hand the UI a fake one. Only types are imported
 * here, so loading this module never loads the engine.
 */
import type { Progress } from '../src/engine/progress.js';
import type { DamagedRange } from '../src/engine/restore.js';
import type { ScrubResult } from '../src/engine/scrub.js';
import type { RestoreState, VersionRecord } from '../src/index/records.js';
import type { BlockDevice } from './devices.js';

export type { BlockDevice, Progress, VersionRecord };

/** What a restore target is right now (checked again by the engine when the restore starts). */
export interface TargetInfo {
  /** Absolute path, or an `rbd://POOL/[NS/]IMAGE` URI. */
  path: string;
  /** What the user will be asked to type before it is overwritten: the file's, device's or RBD image's name. */
  name: string;
  /** `new-rbd`: an RBD image that does not exist yet (created thin); `rbd`: an existing one. */
  kind: 'new-file' | 'file' | 'block' | 'new-rbd' | 'rbd' | 'directory' | 'other';
  /** Current size in bytes (file length, device capacity, image size); 0 for a new file or image. */
  size: number;
  /** Mount points, for block devices. */
  mountpoints: string[];
  /** Why the target cannot be used at all (then nothing else matters), or null. */
  refusal: string | null;
  /** True when restoring destroys existing data: a non-empty file, or any block device. */
  overwrites: boolean;
  /** A warning that does not block (e.g. little free space for a new file). */
  warning: string | null;
  /** An interrupted restore to this target, if one is recorded. */
  interrupted: RestoreState | null;
  /** Extra words for the summary, e.g. the device model. */
  description: string;
  /** What is on it now (a filesystem and its label, a partition table, zeros), when it will be overwritten. */
  contents?: string | null;
}

export interface RestoreRequest {
  target: string;
  /** Overwrite a non-empty target; only ever true after the user typed the target's name. */
  force: boolean;
  /** Continue the interrupted restore of the same version to the same target. */
  resume: boolean;
  /** Id of a version whose intact blocks replace damaged ones at the same offsets (else zeros). */
  fillFrom?: string;
}

export interface RestoreOutcome {
  bytesWritten: number;
  damaged: DamagedRange[];
}

export interface ScrubRequest {
  /** Versions to scrub; empty = every block of the repository. */
  versions: VersionRecord[];
  /** 1–100; undefined = all selected blocks. */
  percent?: number;
}

/** Storage facts of one version, computed on demand (walks its block map). */
export interface VersionUsage {
  /** Distinct non-zero blocks the version references. */
  blocks: number;
  /** Their stored (compressed, encrypted) size. */
  storedBytes: number;
  /** Blocks marked invalid (damaged) or missing from the block table. */
  damagedBlocks: number;
}

export interface RepositorySummary {
  location: string;
  encryption: string;
  blockSize: number;
}

/** Thrown (by the backend) when an operation stopped because the user cancelled it. */
export class CancelledError extends Error {
  /** For a stopped restore: the blocks on the target by its checkpoint, where a resume continues. */
  readonly blocksDone: number | undefined;
  constructor(blocksDone?: number) {
    super('Cancelled by the user.');
    this.name = 'CancelledError';
    this.blocksDone = blocksDone;
  }
}

/** A version mounted as files by a `blocksafe mount` child process (ui/mountChild.ts). */
export interface MountedVersion {
  /** The private temporary directory it is mounted on (removed after unmounting). */
  dir: string;
  /** The image file: DIR/by_id/<id>/data. */
  data: string;
  /** Settles when the mount has ended (unmounted, or its process died): null when cleanly, else why. */
  ended: Promise<string | null>;
  /**
   * Unmounts (SIGINT to the child) and waits until the mount is gone and the directory removed. Rejects with
   * MountFailedError when it is busy (it stays mounted; a second call detaches it lazily).
   */
  unmount(): Promise<void>;
}

/** A message of the mount child, shown as it is (it is written for users; its CLI hints apply as well). */
export class MountFailedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MountFailedError';
  }
}

export interface Backend {
  readonly summary: RepositorySummary;
  /** Newest first. */
  listVersions(): VersionRecord[];
  versionUsage(v: VersionRecord, signal: AbortSignal): Promise<VersionUsage>;
  listDevices(): BlockDevice[];
  inspectTarget(path: string, v: VersionRecord): Promise<TargetInfo>;
  /** Rejects with CancelledError when `signal` aborts (the restore stops after the blocks in flight). */
  restore(v: VersionRecord, req: RestoreRequest, onProgress: (p: Progress) => void, signal: AbortSignal): Promise<RestoreOutcome>;
  /** Present only when the engine has a scrub. */
  scrub?: (req: ScrubRequest, onProgress: (p: Progress) => void, signal: AbortSignal) => Promise<ScrubResult>;
  /** Present only when the engine can remove versions. Refuses protected versions. */
  remove?: (v: VersionRecord) => Promise<void>;
  /** Why `remove` would refuse `v` (protected, younger than the minimum age), asked before the id is typed. */
  removalRefusal?: (v: VersionRecord) => string | null;
  /** Present only when the engine has lifecycle operations. */
  setProtected?: (v: VersionRecord, on: boolean) => Promise<void>;
  addTag?: (v: VersionRecord, tag: string) => Promise<void>;
  removeTag?: (v: VersionRecord, tag: string) => Promise<void>;
  /** Present only when the UI can run `blocksafe mount` (as a child process). */
  mount?: (v: VersionRecord) => Promise<MountedVersion>;
  close(): Promise<void>;
}

/** Opens the repository; `askPassphrase` is called (maybe several times) only when one is needed. */
export type Connect = (askPassphrase: () => Promise<string>) => Promise<Backend>;

/**
 * The engine's messages end with hints for the command line ("Use --force …", "… with --resume"); inside
 * the UI those options do not exist (the UI asks, and offers resume itself), so such sentences are left out.
 */
export function withoutCliHints(message: string): string {
  const sentences = message.split(/(?<=[.;])\s+/);
  const kept: string[] = [];
  for (const s of sentences) {
    if (/(^|\s|\()--[a-z]/.test(s) || /\bblocksafe [a-z]+ /.test(s)) {
      // "…; use --force …" dropped: the sentence before ends the thought.
      if (kept.length) kept[kept.length - 1] = kept[kept.length - 1]!.replace(/;$/, '.');
    } else kept.push(s);
  }
  if (kept.length === 0 || kept.length === sentences.length) return message;
  return kept.join(' ');
}

/** One line for the UI: the message of a blocksafe error, never a stack trace. */
export function errorText(err: unknown): string {
  if (err instanceof MountFailedError) return err.message;
  if (err instanceof Error) {
    // BlocksafeError messages are written for users; anything else gets a hint where to look.
    const isBlocksafe = 'exitCode' in err;
    const first = err.message.split('\n')[0] ?? '';
    return isBlocksafe ? withoutCliHints(first) : `Unexpected problem: ${first} (the CLI command with --debug shows details).`;
  }
  return String(err);
}
