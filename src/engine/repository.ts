import { randomUUID } from 'node:crypto';
import * as path from 'node:path';
import {
  createSlot,
  KEYRING_FORMAT,
  newKeyring,
  newMasterKey,
  openKeyring,
  parseKeyring,
  parseSlot,
  sealKeyring,
  serializeKeyring,
  unlockMasterKeys,
  type Keyring,
  type KeySlot,
  type RepositoryBinding,
  type ScryptParams,
  type SlotType,
} from '../codec/keys.js';
import { decodeObject, encodeObject, ObjectType, type CodecKeys } from '../codec/object.js';
import { BlocksafeError, FormatError, IntegrityError, NotFoundError, UsageError } from '../errors.js';
import { Index } from '../index/index.js';
import type { BlobStore } from '../store/blobstore.js';
import { ObjectNames } from '../store/blobstore.js';
import { DirectoryStore } from '../store/directory.js';
import { injectFaultsFromEnv } from '../store/faulty.js';
import { S3Store, s3Settings, type S3Config } from '../store/s3.js';
import type { SyncReport } from './indexSync.js';
import { StoreLeases } from './leases.js';
import { DEFAULT_LOCK_SETTINGS, LockManager, type LockSettings } from './locks.js';
import { TrustStore } from './trust.js';
import type { WorkerInit } from './workerProtocol.js';

export const REPOSITORY_FORMAT = 1;

/** blocksafe.json: the repository descriptor (plain JSON, readable without any key; authenticated by the keyring). */
export interface Descriptor {
  format: 'blocksafe-repository';
  format_version: number;
  id: string;
  created: string;
  block_size: number;
  encryption: 'chacha20-poly1305' | 'none';
  compression: 'zstd' | 'none';
  compression_level: number;
}

export interface Secret {
  type: SlotType;
  value: Uint8Array;
}
/**
 * Asked only when the repository is encrypted (a prompt must not appear for plain repositories).
 * `explicit` says the user gave a secret on purpose (option, file or environment variable): a repository
 * that then claims to be unencrypted is refused, not silently used in clear.
 */
export type SecretSource = (() => Promise<Secret>) & { explicit?: boolean };

export interface InitOptions {
  encryption: Descriptor['encryption'];
  compression: Descriptor['compression'];
  compressionLevel: number;
  blockSize: number;
  secret?: Secret;
  scrypt?: ScryptParams;
}

/** How a repository is opened (beyond the store and the secret). */
export interface OpenOptions {
  locks?: LockSettings;
  /** Where this machine remembers the repositories it opened (trust.ts); null: remember nothing. */
  trustDir?: string | null;
}

export class Repository {
  readonly locks: LockManager;
  /** This machine's memory of the repository (trust.ts). */
  readonly trust: TrustStore;
  /** What the last index sync with the store found (indexSync.ts), for the caller to report. */
  syncReport: SyncReport | null = null;

  private constructor(
    readonly store: BlobStore,
    readonly descriptor: Descriptor,
    public keyring: Keyring,
    readonly index: Index,
    /** The unlocked master key (null for unencrypted repositories): key slot and rekey operations need it. */
    public masterKey: Uint8Array | null,
    /** Which key slot the secret opened (null when unencrypted). */
    public openedSlot: number | null,
    /** False when nothing may be written to the store (a read-only medium with a temporary index). */
    readonly writable: boolean,
    /** The secret the repository was opened with (null when unencrypted). */
    readonly openedWith: Secret | null,
    lockSettings: LockSettings,
    trustDir: string | null,
    /** Runs after close (removes a temporary index). */
    private readonly afterClose?: () => void,
  ) {
    this.trust = new TrustStore(trustDir);
    const leases = writable
      ? new StoreLeases(store, { encode: (n, p) => this.encodeMeta(ObjectType.Lock, p, n), decode: (n, r) => this.decodeMeta(ObjectType.Lock, r, n) }, index.indexId, lockSettings)
      : null;
    this.locks = new LockManager(index, leases, lockSettings);
  }

  /** True when the index is a temporary one rebuilt because the repository is read-only. */
  get temporaryIndex(): boolean {
    return this.afterClose !== undefined;
  }

  get id(): string {
    return this.descriptor.id;
  }
  get blockSize(): number {
    return this.descriptor.block_size;
  }

  get codecKeys(): CodecKeys {
    return this.descriptor.encryption === 'none' ? { currentKeyId: 0, dataKeys: new Map() } : { currentKeyId: this.keyring.currentKeyId, dataKeys: this.keyring.dataKeys };
  }

  workerInit(): Omit<WorkerInit, 'arena' | 'arenaSlotSize'> {
    const keys = this.codecKeys;
    return {
      macKey: this.keyring.macKey,
      dataKeys: [...keys.dataKeys],
      currentKeyId: keys.currentKeyId,
      compress: this.descriptor.compression === 'zstd',
      zstdLevel: this.descriptor.compression_level,
      blockSize: this.blockSize,
    };
  }

  /** Encodes a metadata object (manifest, attributes, lease) bound to its name. */
  encodeMeta(type: ObjectType, plain: Uint8Array, name: string): Buffer {
    return encodeObject(plain, this.codecKeys, { type, compress: true, zstdLevel: 3, context: Buffer.from(name) });
  }

  /** Decodes a metadata object; its plaintext is bounded by its type (codec/object.ts MAX_PLAIN) or `maxPlain`. */
  decodeMeta(type: ObjectType, raw: Uint8Array, name: string, maxPlain?: number): Buffer {
    const obj = decodeObject(raw, this.codecKeys, Buffer.from(name), { maxPlain });
    if (obj.type !== type) throw new IntegrityError(`Object ${name} has type ${obj.type}, expected ${type}.`);
    return obj.plain;
  }

  /**
   * Reads the keyring again (another process rotated keys: a block under a key id we do not know yet).
   * Returns true when it changed.
   */
  async reloadKeyring(): Promise<boolean> {
    if (!this.masterKey) return false;
    const sealed = await this.store.tryGet(ObjectNames.keyring);
    const fresh = sealed ? openKeyring(sealed, this.masterKey) : null;
    if (!fresh || fresh.generation === this.keyring.generation) return false;
    this.keyring = fresh;
    return true;
  }

  async close(): Promise<void> {
    await this.locks.releaseAll().catch(() => undefined);
    await this.store.close();
    await this.index.close();
    this.afterClose?.();
  }

  static async init(store: BlobStore, opts: InitOptions, indexDir: (id: string) => string, open: OpenOptions = {}): Promise<Repository> {
    if (await store.has(ObjectNames.descriptor)) {
      throw new UsageError(`${store.location} already holds a blocksafe repository; nothing was changed.`);
    }
    for await (const entry of store.list('')) {
      throw new UsageError(`${store.location} is not empty (it holds ${entry.name}); choose an empty or new directory.`);
    }
    validateBlockSize(opts.blockSize);
    const descriptor: Descriptor = {
      format: 'blocksafe-repository',
      format_version: REPOSITORY_FORMAT,
      id: randomUUID(),
      created: new Date().toISOString(),
      block_size: opts.blockSize,
      encryption: opts.encryption,
      compression: opts.compression,
      compression_level: opts.compressionLevel,
    };
    const keyring = newKeyring(bindingOf(descriptor));
    const master = opts.encryption === 'none' ? null : newMasterKey();
    if (!master) {
      await store.put(ObjectNames.keyring, serializeKeyring(keyring));
    } else {
      if (!opts.secret) throw new UsageError('An encrypted repository needs a passphrase or a key file.');
      await store.put(ObjectNames.slot(1), Buffer.from(JSON.stringify(createSlot(1, opts.secret.type, opts.secret.value, master, opts.scrypt), null, 2)));
      await store.put(ObjectNames.keyring, sealKeyring(keyring, master));
    }
    // The descriptor goes last: a directory without it is not (yet) a repository.
    await store.sync();
    await store.put(ObjectNames.descriptor, Buffer.from(JSON.stringify(descriptor, null, 2) + '\n'));
    await store.sync();
    new TrustStore(open.trustDir ?? null).check(descriptor.id, descriptor.encryption, keyring.generation);
    const index = Index.openAt(indexDir(descriptor.id), descriptor.id, keyring.macKey);
    return new Repository(store, descriptor, keyring, index, master, master ? 1 : null, true, opts.secret ?? null, open.locks ?? DEFAULT_LOCK_SETTINGS, open.trustDir ?? null);
  }

  static async open(store: BlobStore, secret: SecretSource, indexDir: (id: string) => string, opts: OpenOptions = {}): Promise<Repository> {
    const keys = await unlock(store, secret, opts);
    const index = Index.openAt(indexDir(keys.descriptor.id), keys.descriptor.id, keys.keyring.macKey);
    const repo = new Repository(store, keys.descriptor, keys.keyring, index, keys.masterKey, keys.openedSlot, true, keys.secret, opts.locks ?? DEFAULT_LOCK_SETTINGS, opts.trustDir ?? null);
    await repo.upgradeKeyring().catch(() => undefined); // best effort: a read-only store keeps the old form
    return repo;
  }

  /** A repository object over an index that is being built elsewhere (index rebuild, a temporary index). */
  static withIndex(store: BlobStore, keys: UnlockedKeys, index: Index, writable: boolean, opts: OpenOptions = {}, afterClose?: () => void): Repository {
    return new Repository(store, keys.descriptor, keys.keyring, index, keys.masterKey, keys.openedSlot, writable, keys.secret, opts.locks ?? DEFAULT_LOCK_SETTINGS, opts.trustDir ?? null, afterClose);
  }

  /** Writes the keyring sealed under the master key (a new generation); in clear for unencrypted repositories. */
  async saveKeyring(): Promise<void> {
    this.keyring = { ...this.keyring, format: KEYRING_FORMAT, generation: this.keyring.generation + 1, repository: this.keyring.repository ?? bindingOf(this.descriptor) };
    await this.store.put(ObjectNames.keyring, this.masterKey ? sealKeyring(this.keyring, this.masterKey) : serializeKeyring(this.keyring));
    await this.store.sync();
  }

  /** A keyring of format 1 (no binding of the descriptor) is rewritten once in the current format. */
  private async upgradeKeyring(): Promise<void> {
    if (this.keyring.format >= KEYRING_FORMAT || !this.masterKey) return;
    await this.saveKeyring();
  }
}

function bindingOf(d: Descriptor): RepositoryBinding {
  return { id: d.id, encryption: d.encryption, block_size: d.block_size, compression: d.compression, compression_level: d.compression_level };
}

export interface UnlockedKeys {
  descriptor: Descriptor;
  keyring: Keyring;
  masterKey: Uint8Array | null;
  openedSlot: number | null;
  /** The secret that opened it (kept in memory for a master-key rotation, which re-wraps it). */
  secret: Secret | null;
}

/**
 * Reads the descriptor and unlocks the keyring (asking for the secret only when the repository is
 * encrypted). The descriptor is plain JSON anyone with the medium can edit, so what it says is checked:
 * against the authenticated copy in the keyring when encrypted, and when it claims "encryption: none",
 * against the key slots present, a secret the user gave on purpose, and this machine's trust record.
 */
export async function unlock(store: BlobStore, secret: SecretSource, opts: OpenOptions = {}): Promise<UnlockedKeys> {
  const descriptor = await readDescriptor(store);
  const trust = new TrustStore(opts.trustDir ?? null);
  const sealed = await store.tryGet(ObjectNames.keyring);
  if (!sealed) throw new IntegrityError(`The keyring (${ObjectNames.keyring}) is missing from ${store.location}; the repository cannot be opened.`);
  if (descriptor.encryption === 'none') {
    const downgrade = (why: string) =>
      new IntegrityError(`The repository at ${store.location} claims "encryption: none", but ${why}: its descriptor or keyring was replaced (a downgrade attack?). Nothing was read or written.`);
    if (await hasSlots(store)) throw downgrade('it has key slots');
    if (secret.explicit) throw downgrade('a passphrase or key file was given for it');
    const keyring = parseKeyring(sealed);
    checkBinding(keyring, descriptor, store);
    trust.check(descriptor.id, 'none', keyring.generation);
    return { descriptor, keyring, masterKey: null, openedSlot: null, secret: null };
  }
  const slots = await readSlots(store);
  const s = await secret();
  for (const { masterKey, slot } of unlockMasterKeys(slots, s.type, s.value)) {
    const keyring = openKeyring(sealed, masterKey);
    if (!keyring) continue; // an old slot left by an interrupted master-key rotation
    checkBinding(keyring, descriptor, store);
    trust.check(descriptor.id, descriptor.encryption, keyring.generation);
    return { descriptor, keyring, masterKey, openedSlot: slot, secret: s };
  }
  // The secret was right (a slot opened): a keyring that does not authenticate is damaged or replaced.
  throw new IntegrityError(`The keyring of ${store.location} does not open with the master key of the slot this secret opens (keyring damaged or replaced).`);
}

/** The keyring's authenticated copy of the descriptor must agree with blocksafe.json. */
function checkBinding(keyring: Keyring, d: Descriptor, store: BlobStore): void {
  const b = keyring.repository;
  if (!b) return; // format 1: bound on the next rewrite
  const mismatch = (Object.keys(b) as (keyof RepositoryBinding)[]).find((k) => b[k] !== d[k]);
  if (mismatch) {
    throw new IntegrityError(
      `The repository descriptor ${ObjectNames.descriptor} at ${store.location} says ${mismatch} = ${JSON.stringify(d[mismatch])}, but the keyring authenticates ${JSON.stringify(b[mismatch])}: the descriptor was edited. Nothing was read or written; put the original back.`,
    );
  }
}

export async function readDescriptor(store: BlobStore): Promise<Descriptor> {
  const raw = await store.tryGet(ObjectNames.descriptor);
  if (!raw) throw new NotFoundError(`No blocksafe repository at ${store.location} (no ${ObjectNames.descriptor}); check --repo or run "blocksafe init".`);
  // A damaged or edited descriptor is an integrity problem (exit 3); a foreign or newer one a format problem.
  if (raw.length > 64 * 1024) throw new IntegrityError(`${ObjectNames.descriptor} in ${store.location} is damaged (far too large).`);
  let d: Descriptor;
  try {
    d = JSON.parse(raw.toString('utf8')) as Descriptor;
  } catch {
    throw new IntegrityError(`${ObjectNames.descriptor} in ${store.location} is damaged (not JSON).`);
  }
  if (typeof d !== 'object' || d === null || d.format !== 'blocksafe-repository')
    throw new FormatError(`${store.location} is not a blocksafe repository (${ObjectNames.descriptor} has a foreign format).`);
  if (!Number.isSafeInteger(d.format_version) || d.format_version < 1)
    throw new IntegrityError(`${ObjectNames.descriptor} in ${store.location} is damaged (format_version ${JSON.stringify(d.format_version)}).`);
  if (d.format_version > REPOSITORY_FORMAT) {
    throw new FormatError(`The repository at ${store.location} has format ${d.format_version}, newer than this blocksafe supports (${REPOSITORY_FORMAT}); use a newer blocksafe.`);
  }
  const ok =
    typeof d.id === 'string' &&
    /^[A-Za-z0-9-]{1,64}$/.test(d.id) &&
    (d.encryption === 'chacha20-poly1305' || d.encryption === 'none') &&
    (d.compression === 'zstd' || d.compression === 'none') &&
    Number.isInteger(d.compression_level) &&
    d.compression_level >= 1 &&
    d.compression_level <= 19 &&
    isValidBlockSize(d.block_size);
  if (!ok) throw new IntegrityError(`${ObjectNames.descriptor} in ${store.location} is damaged (a field is missing or has an impossible value).`);
  return d;
}

async function hasSlots(store: BlobStore): Promise<boolean> {
  for await (const e of store.list(ObjectNames.slotPrefix)) if (/^keys\/slot-\d+\.json$/.test(e.name)) return true;
  return false;
}

export async function readSlots(store: BlobStore): Promise<KeySlot[]> {
  const slots: KeySlot[] = [];
  for await (const { name, size } of store.list(ObjectNames.slotPrefix)) {
    if (!/^keys\/slot-\d+\.json$/.test(name)) continue;
    if (size > 64 * 1024) throw new IntegrityError(`Key slot ${name} is damaged (far too large).`);
    const raw = await store.tryGet(name);
    if (raw) slots.push(parseSlot(raw.toString('utf8'), name));
  }
  if (slots.length === 0) throw new IntegrityError(`The repository at ${store.location} has no key slots; it cannot be unlocked.`);
  return slots.sort((a, b) => a.id - b.id);
}

function isValidBlockSize(n: unknown): n is number {
  return typeof n === 'number' && Number.isInteger(n) && n >= 64 * 1024 && n <= 64 * 1024 * 1024 && (n & (n - 1)) === 0;
}

function validateBlockSize(n: number): void {
  if (!isValidBlockSize(n)) throw new UsageError(`Block size ${n} is not a power of two between 64K and 64M.`);
}

/** Opens the blob store a --repo value names; `s3` is the [s3] configuration for s3:// repositories. */
export function openStore(repo: string, s3?: Partial<S3Config>): BlobStore {
  // injectFaultsFromEnv: a no-op unless the torture harness's test-only variables are set (src/store/faulty.ts)
  if (repo.startsWith('s3://')) return injectFaultsFromEnv(S3Store.fromUrl(repo, s3Settings(s3)));
  const dir = repo.startsWith('file://') ? new URL(repo).pathname : repo;
  return injectFaultsFromEnv(new DirectoryStore(path.resolve(dir)));
}

/** Where the LMDB index of a repository lives: inside the directory for directory stores, in [s3] state_dir/<id> for S3. */
export function indexDirFor(store: BlobStore): (id: string) => string {
  if (store instanceof DirectoryStore) return () => path.join(store.root, 'index');
  if (store instanceof S3Store) return (id) => store.indexDir(id);
  throw new BlocksafeError('No local index location for this store.');
}
