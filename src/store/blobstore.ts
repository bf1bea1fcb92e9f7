import { UsageError } from '../errors.js';

/** One entry of a listing: sizes and times come with the listing, so nobody has to ask per object. */
export interface ObjectInfo {
  name: string;
  size: number;
  /** Last modification, ms since epoch, by the store's clock (file mtime, S3 LastModified). */
  mtime: number;
}

export interface ListOptions {
  /** Only names are needed: a store may report size and mtime as 0 when they would cost extra calls. */
  namesOnly?: boolean;
}

/**
 * A blob store holds named, immutable-once-written objects: block objects, version manifests, key slots,
 * the keyring and the repository descriptor. Names are '/'-separated relative paths such as
 * `data/3f/3f2a…` or `manifests/k7f2m9qa`. The same interface is implemented by a directory (USB disk)
 * and by an S3 bucket, so every command works on both.
 */
export interface BlobStore {
  /** Human-readable location, for messages. */
  readonly location: string;
  /** Stores `data` under `name` atomically: readers see the old object or the whole new one. */
  put(name: string, data: Uint8Array): Promise<void>;
  /** Makes every `put` that has resolved durable (directory fsyncs); call before the index refers to them. */
  sync(): Promise<void>;
  /** The object, or throws NotFoundError. */
  get(name: string): Promise<Buffer>;
  /** The object or undefined when it does not exist. */
  tryGet(name: string): Promise<Buffer | undefined>;
  /**
   * Optional: reads the object into `out` and returns its size (undefined when it does not exist). When it is
   * larger than `out`, returns its size without reading it. Saves the block pipeline an allocation per block.
   */
  readInto?(name: string, out: Uint8Array): Promise<number | undefined>;
  has(name: string): Promise<boolean>;
  /** Stored size in bytes, or undefined when the object does not exist. */
  size(name: string): Promise<number | undefined>;
  delete(names: string[]): Promise<void>;
  /** Every object under `prefix` (e.g. "data/"), in no particular order. */
  list(prefix: string, opts?: ListOptions): AsyncIterable<ObjectInfo>;
  close(): Promise<void>;
  /** Removes leftovers of interrupted writes older than `olderThanMs`; returns how many. Optional. */
  removeStaleTemp?(olderThanMs: number): Promise<number>;
}

/** Object names are '/'-separated segments of letters, digits, '.', '_' and '-', never '.', '..' or empty. */
const SEGMENT = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$/;

/**
 * Refuses a name that could leave the store's root (absolute, '..', empty segments, odd characters). Names
 * are built from ids and checksums that may come from untrusted input (an import file, a manifest), so
 * every store checks them before touching a path or key.
 */
export function checkObjectName(name: string): string {
  const parts = name.split('/');
  if (parts.length === 0 || parts.length > 4 || parts.some((p) => !SEGMENT.test(p) || p === '.' || p === '..')) {
    throw new UsageError(`"${name.slice(0, 80)}" is not a valid object name in a blocksafe repository.`);
  }
  return name;
}

/** Object names used by the repository (see docs/FORMAT.md). */
export const ObjectNames = {
  descriptor: 'blocksafe.json',
  keyring: 'keys/keyring',
  slot: (id: number) => `keys/slot-${id}.json`,
  slotPrefix: 'keys/',
  block: (checksumHex: string) => `data/${checksumHex.slice(0, 2)}/${checksumHex}`,
  blockPrefix: 'data/',
  manifest: (versionId: string) => `manifests/${versionId}`,
  manifestPrefix: 'manifests/',
  attributes: (versionId: string) => `attributes/${versionId}`,
  attributesPrefix: 'attributes/',
  lease: (holder: string) => `locks/${holder}`,
  leasePrefix: 'locks/',
  gcGeneration: 'gc/generation',
};
