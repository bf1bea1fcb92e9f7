/** Records kept in the LMDB index. Field names are snake_case because they are also the JSON schema. */

export interface VersionStats {
  bytes_read: number;
  bytes_written: number;
  bytes_deduplicated: number;
  bytes_sparse: number;
  blocks_read: number;
  blocks_written: number;
  blocks_deduplicated: number;
  blocks_sparse: number;
  /** Blocks taken from the base version by reference without reading (hints). */
  blocks_referenced: number;
  /** Blocks outside the hints re-read to check the hints (included in blocks_read or blocks_sparse). */
  blocks_sampled: number;
  duration_ms: number;
}

export function emptyStats(): VersionStats {
  return {
    bytes_read: 0,
    bytes_written: 0,
    bytes_deduplicated: 0,
    bytes_sparse: 0,
    blocks_read: 0,
    blocks_written: 0,
    blocks_deduplicated: 0,
    blocks_sparse: 0,
    blocks_referenced: 0,
    blocks_sampled: 0,
    duration_ms: 0,
  };
}

export interface VersionRecord {
  format: 1;
  id: string;
  name: string;
  snapshot_name: string;
  /** Creation time, ISO-8601 UTC. */
  date: string;
  size: number;
  block_size: number;
  complete: boolean;
  valid: boolean;
  protected: boolean;
  tags: string[];
  /** Expiry time, ISO-8601 UTC, or null. */
  expire: string | null;
  /** Number of leading blocks whose map entries are committed (resume point of an incomplete backup). */
  blocks_done: number;
  /** Where the data came from (path or URI), for display and deep scrub. */
  source: string;
  /** Version this one was taken incrementally from, if any. */
  base: string | null;
  stats: VersionStats;
  /** Set by `rm` before it deletes the manifest, so a concurrent index sync does not report a vanished version. */
  removing?: boolean;
  /** Generation of the attributes object last written or read for this version (rollback detection). */
  attributes_generation?: number;
  /** Store time of the attributes object when it was last read: a listing with another time means "read it again". */
  attributes_mtime?: number;
}

export interface BlockRecord {
  /** Plaintext length. */
  size: number;
  /** Object length in the store. */
  stored: number;
  key_id: number;
  valid: boolean;
  /** Last successful verification (ms since epoch); creation counts as one. */
  verified: number;
}

/** Who holds a lock: enough to tell, on the same machine, whether the process is still alive. */
export interface LockHolder {
  host: string;
  /** The kernel's boot id (/proc/sys/kernel/random/boot_id): pids are only comparable within one boot. */
  boot_id: string;
  /** Inode of the holder's pid namespace (/proc/self/ns/pid): pids are only comparable within one namespace. */
  pid_ns: string;
  pid: number;
  /** Process start time (clock ticks since boot, /proc/PID/stat field 22): detects a reused pid. */
  pid_start: number | null;
  command: string;
}

export interface LockRecord extends LockHolder {
  resource: string;
  mode: 'shared' | 'exclusive';
  /** ISO-8601 UTC. */
  started: string;
  /** Last heartbeat (ms since epoch): a holder that stopped refreshing is stale after the configured time. */
  refreshed: number;
}

/** Progress of a restore, so an interrupted one can continue where it stopped. */
export interface RestoreState {
  target: string;
  version: string;
  blocks_done: number;
  /** Damaged ranges found before the last checkpoint: a resumed restore reports them too. */
  damaged: { offset: number; length: number; reason: string }[];
  /** The target read as zeros where nothing was written (fresh or truncated file). */
  zeroed: boolean;
  sparse: boolean;
  started: string;
}

/** A block (or stray object) that no version referenced when a cleanup looked; deleted after the grace period. */
export interface GcCandidate {
  /** When it was first found unreferenced (ms since epoch). */
  marked_at: number;
  /** Set while a cleanup deletes its object; a backup needing the block waits until it is gone. */
  doomed: boolean;
  /** Stored size, for reporting what was freed. */
  stored: number;
}
