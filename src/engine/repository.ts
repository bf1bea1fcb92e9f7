import { randomUUID } from 'node:crypto';
import * as path from 'node:path';
import {
  createSlot,
  newKeyring,
  newMasterKey,
  openKeyring,
  parseKeyring,
  sealKeyring,
  serializeKeyring,
  unlockMasterKey,
  type Keyring,
  type KeySlot,
  type ScryptParams,
  type SlotType,
} from '../codec/keys.js';
import { decodeObject, encodeObject, type CodecKeys, type ObjectType } from '../codec/object.js';
import { BlocksafeError, FormatError, IntegrityError, NotFoundError, UsageError } from '../errors.js';
import { Index } from '../index/index.js';
import type { BlobStore } from '../store/blobstore.js';
import { ObjectNames } from '../store/blobstore.js';
import { DirectoryStore } from '../store/directory.js';
import { S3Store, s3Settings, type S3Config } from '../store/s3.js';
import type { WorkerInit } from './workerProtocol.js';

export const REPOSITORY_FORMAT = 1;

/** blocksafe.json: the repository descriptor (plain JSON, readable without any key). */
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
/** Asked only when the repository is encrypted (a prompt must not appear for plain repositories). */
export type SecretSource = () => Promise<Secret>;

export interface InitOptions {
  encryption: Descriptor['encryption'];
  compression: Descriptor['compression'];
  compressionLevel: number;
  blockSize: number;
  secret?: Secret;
  scrypt?: ScryptParams;
}

export class Repository {
  private constructor(
    readonly store: BlobStore,
    readonly descriptor: Descriptor,
    public keyring: Keyring,
    readonly index: Index,
    /** The unlocked master key (null for unencrypted repositories): key slot and rekey operations need it. */
    readonly masterKey: Uint8Array | null,
    /** Which key slot the secret opened (null when unencrypted). */
    readonly openedSlot: number | null,
    /** Runs after close (removes a temporary index). */
    private readonly afterClose?: () => void,
  ) {}

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
    return this.descriptor.encryption === 'none'
      ? { currentKeyId: 0, dataKeys: new Map() }
      : { currentKeyId: this.keyring.currentKeyId, dataKeys: this.keyring.dataKeys };
  }

  workerInit(): WorkerInit {
    const keys = this.codecKeys;
    return {
      macKey: this.keyring.macKey,
      dataKeys: [...keys.dataKeys],
      currentKeyId: keys.currentKeyId,
      compress: this.descriptor.compression === 'zstd',
      zstdLevel: this.descriptor.compression_level,
    };
  }

  /** Encodes a metadata object (manifest, attributes) bound to its name. */
  encodeMeta(type: ObjectType, plain: Uint8Array, name: string): Buffer {
    return encodeObject(plain, this.codecKeys, { type, compress: true, zstdLevel: 3, context: Buffer.from(name) });
  }

  decodeMeta(type: ObjectType, raw: Uint8Array, name: string): Buffer {
    const obj = decodeObject(raw, this.codecKeys, Buffer.from(name));
    if (obj.type !== type) throw new IntegrityError(`Object ${name} has type ${obj.type}, expected ${type}.`);
    return obj.plain;
  }

  async close(): Promise<void> {
    await this.store.close();
    await this.index.close();
    this.afterClose?.();
  }

  static async init(store: BlobStore, opts: InitOptions, indexDir: (id: string) => string): Promise<Repository> {
    if (await store.has(ObjectNames.descriptor)) {
      throw new UsageError(`${store.location} already holds a blocksafe repository; nothing was changed.`);
    }
    for await (const name of store.list('')) {
      throw new UsageError(`${store.location} is not empty (it holds ${name}); choose an empty or new directory.`);
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
    const keyring = newKeyring();
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
    const index = Index.openAt(indexDir(descriptor.id), descriptor.id);
    return new Repository(store, descriptor, keyring, index, master, opts.encryption === 'none' ? null : 1);
  }

  static async open(store: BlobStore, secret: SecretSource, indexDir: (id: string) => string): Promise<Repository> {
    const keys = await unlock(store, secret);
    const index = Index.openAt(indexDir(keys.descriptor.id), keys.descriptor.id);
    return new Repository(store, keys.descriptor, keys.keyring, index, keys.masterKey, keys.openedSlot);
  }

  /** A repository object over an index that is being built elsewhere (index rebuild). */
  static withIndex(store: BlobStore, keys: UnlockedKeys, index: Index, afterClose?: () => void): Repository {
    return new Repository(store, keys.descriptor, keys.keyring, index, keys.masterKey, keys.openedSlot, afterClose);
  }

}

export interface UnlockedKeys {
  descriptor: Descriptor;
  keyring: Keyring;
  masterKey: Uint8Array | null;
  openedSlot: number | null;
}

/** Reads the descriptor and unlocks the keyring (asking for the secret only when the repository is encrypted). */
export async function unlock(store: BlobStore, secret: SecretSource): Promise<UnlockedKeys> {
  const descriptor = await readDescriptor(store);
  const sealed = await store.tryGet(ObjectNames.keyring);
  if (!sealed) throw new IntegrityError(`The keyring (${ObjectNames.keyring}) is missing from ${store.location}; the repository cannot be opened.`);
  if (descriptor.encryption === 'none') return { descriptor, keyring: parseKeyring(sealed), masterKey: null, openedSlot: null };
  const slots = await readSlots(store);
  const s = await secret();
  const { masterKey, slot } = unlockMasterKey(slots, s.type, s.value);
  return { descriptor, keyring: openKeyring(sealed, masterKey), masterKey, openedSlot: slot };
}

export async function readDescriptor(store: BlobStore): Promise<Descriptor> {
  const raw = await store.tryGet(ObjectNames.descriptor);
  if (!raw) throw new NotFoundError(`No blocksafe repository at ${store.location} (no ${ObjectNames.descriptor}); check --repo or run "blocksafe init".`);
  let d: Descriptor;
  try {
    d = JSON.parse(raw.toString('utf8')) as Descriptor;
  } catch {
    throw new FormatError(`${ObjectNames.descriptor} in ${store.location} is damaged (not JSON).`);
  }
  if (d.format !== 'blocksafe-repository') throw new FormatError(`${store.location} is not a blocksafe repository (${ObjectNames.descriptor} has a foreign format).`);
  if (d.format_version > REPOSITORY_FORMAT) {
    throw new FormatError(`The repository at ${store.location} has format ${d.format_version}, newer than this blocksafe supports (${REPOSITORY_FORMAT}); use a newer blocksafe.`);
  }
  return d;
}

export async function readSlots(store: BlobStore): Promise<KeySlot[]> {
  const slots: KeySlot[] = [];
  for await (const name of store.list(ObjectNames.slotPrefix)) {
    if (!/^keys\/slot-\d+\.json$/.test(name)) continue;
    slots.push(JSON.parse((await store.get(name)).toString('utf8')) as KeySlot);
  }
  if (slots.length === 0) throw new IntegrityError(`The repository at ${store.location} has no key slots; it cannot be unlocked.`);
  return slots.sort((a, b) => a.id - b.id);
}

function validateBlockSize(n: number): void {
  if (n < 64 * 1024 || n > 64 * 1024 * 1024 || (n & (n - 1)) !== 0) {
    throw new UsageError(`Block size ${n} is not a power of two between 64K and 64M.`);
  }
}

/** Opens the blob store a --repo value names; `s3` is the [s3] configuration for s3:// repositories. */
export function openStore(repo: string, s3?: Partial<S3Config>): BlobStore {
  if (repo.startsWith('s3://')) return S3Store.fromUrl(repo, s3Settings(s3));
  const dir = repo.startsWith('file://') ? new URL(repo).pathname : repo;
  return new DirectoryStore(path.resolve(dir));
}

/** Where the LMDB index of a repository lives: inside the directory for directory stores, in [s3] state_dir/<id> for S3. */
export function indexDirFor(store: BlobStore): (id: string) => string {
  if (store instanceof DirectoryStore) return () => path.join(store.root, 'index');
  if (store instanceof S3Store) return (id) => store.indexDir(id);
  throw new BlocksafeError('No local index location for this store.');
}
