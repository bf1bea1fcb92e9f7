import { hkdfSync, randomBytes, scryptSync } from 'node:crypto';
import nacl from 'tweetnacl';
import { FormatError, IntegrityError, KeyError } from '../errors.js';

/**
 * Key slots and the keyring.
 *
 * A random 32-byte master key never touches the disk in clear: each key slot holds it wrapped (tweetnacl
 * secretbox) under a key-encryption key derived from a passphrase (scrypt) or a key file (HKDF). The
 * master key in turn seals the keyring, which holds the MAC key (block identity) and the data keys by
 * integer id. Adding or removing a slot never re-encrypts data; a new data key id can be introduced later.
 */
export type SlotType = 'passphrase' | 'keyfile';

export interface ScryptParams {
  N: number;
  r: number;
  p: number;
}
/**
 * scrypt cost of new passphrase slots: N = 2^16, r = 8 (64 MiB), p ≥ 2 — OWASP's equivalent of its minimum
 * N = 2^17, r = 8, p = 1 at half the memory — with p raised on fast machines until one derivation takes
 * about half a second (restic's target). Slots record their own parameters.
 */
export const MIN_SCRYPT: ScryptParams = { N: 2 ** 16, r: 8, p: 2 };

/**
 * Limits on the parameters a stored slot may ask for: a slot is untrusted input, and N = 2^30 would make
 * every command allocate 1 GiB and run for minutes. 128 MiB of memory, and about 8× the work of our own.
 */
const MAX_SCRYPT_MEMORY = 128 * 2 ** 20;
const MAX_SCRYPT_WORK = 2 ** 23; // N · r · p

/** Parameters for a new slot on this machine (a few test derivations; BLOCKSAFE_TEST_FAST_KDF makes tests cheap). */
export function calibrateScrypt(targetMs = 500): ScryptParams {
  if (process.env.BLOCKSAFE_TEST_FAST_KDF) return { N: 2 ** 10, r: 8, p: 1 };
  const salt = randomBytes(16);
  const start = process.hrtime.bigint();
  scryptSync('calibration', salt, 32, { N: MIN_SCRYPT.N, r: MIN_SCRYPT.r, p: 1, maxmem: scryptMemory(MIN_SCRYPT) });
  const oneMs = Number(process.hrtime.bigint() - start) / 1e6;
  return { ...MIN_SCRYPT, p: Math.min(16, Math.max(MIN_SCRYPT.p, Math.round(targetMs / Math.max(oneMs, 1)))) };
}

function scryptMemory(p: ScryptParams): number {
  return 128 * p.N * p.r + 16 * 2 ** 20;
}

/** Refuses stored scrypt parameters that are malformed or beyond the limits above. */
function checkScrypt(kdf: { N: unknown; r: unknown; p: unknown }, slot: number | string): ScryptParams {
  const { N, r, p } = kdf;
  const int = (x: unknown): x is number => typeof x === 'number' && Number.isInteger(x) && x > 0;
  if (!int(N) || !int(r) || !int(p) || (N & (N - 1)) !== 0 || N < 2) throw badSlot(slot, 'malformed scrypt parameters');
  if (128 * N * r > MAX_SCRYPT_MEMORY || N * r * p > MAX_SCRYPT_WORK) {
    throw badSlot(slot, `scrypt parameters N=${N}, r=${r}, p=${p} exceed what blocksafe allows (at most ${MAX_SCRYPT_MEMORY / 2 ** 20} MiB and N·r·p ≤ 2^23)`);
  }
  return { N, r, p };
}

function badSlot(id: number | string, why: string): IntegrityError {
  return new IntegrityError(`Key slot ${id} is damaged or was edited (${why}); use another slot's passphrase or key file.`);
}

export const SLOT_FORMAT = 1;

export interface KeySlot {
  format: 1;
  id: number;
  type: SlotType;
  created: string;
  kdf: { name: 'scrypt'; salt: string; N: number; r: number; p: number } | { name: 'hkdf-sha256'; salt: string };
  nonce: string;
  wrapped: string;
}

/** The descriptor fields the keyring authenticates (blocksafe.json itself is plain, editable JSON). */
export interface RepositoryBinding {
  id: string;
  encryption: string;
  block_size: number;
  compression: string;
  compression_level: number;
}

export const KEYRING_FORMAT = 2;

export interface Keyring {
  format: number;
  /** Incremented on every rewrite: a local trust record notices an old keyring put back. */
  generation: number;
  /** Null only for keyrings of format 1, written before the binding existed (added on the next rewrite). */
  repository: RepositoryBinding | null;
  macKey: Uint8Array;
  currentKeyId: number;
  dataKeys: Map<number, Uint8Array>;
}

const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64');
const unb64 = (s: string) => new Uint8Array(Buffer.from(s, 'base64'));

function deriveKek(slot: Pick<KeySlot, 'kdf'>, secret: Uint8Array, slotId: number | string = '?'): Uint8Array {
  const salt = Buffer.from(slot.kdf.salt, 'base64');
  if (slot.kdf.name === 'scrypt') {
    const params = checkScrypt(slot.kdf, Number(slotId));
    return new Uint8Array(scryptSync(secret, salt, 32, { ...params, maxmem: scryptMemory(params) }));
  }
  return new Uint8Array(hkdfSync('sha256', secret, salt, 'blocksafe key file', 32));
}

/**
 * A key slot read from the store, checked field by field before anything is derived from it: a newer slot
 * format is refused with a clear message, a malformed one is exit 3.
 */
export function parseSlot(text: string, name: string): KeySlot {
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(text) as Record<string, unknown>;
  } catch {
    throw badSlot(name, 'not JSON');
  }
  if (typeof raw !== 'object' || raw === null) throw badSlot(name, 'not a JSON object');
  if (typeof raw.format === 'number' && raw.format > SLOT_FORMAT)
    throw new FormatError(`Key slot ${name} has format ${raw.format}, newer than this blocksafe understands (${SLOT_FORMAT}); use a newer blocksafe.`);
  const kdf = raw.kdf as Record<string, unknown> | undefined;
  const b64ok = (v: unknown, bytes?: number) => typeof v === 'string' && /^[A-Za-z0-9+/]*={0,2}$/.test(v) && (bytes === undefined || Buffer.from(v, 'base64').length === bytes);
  if (raw.format !== SLOT_FORMAT || typeof raw.id !== 'number' || (raw.type !== 'passphrase' && raw.type !== 'keyfile') || !kdf || typeof kdf !== 'object')
    throw badSlot(name, 'missing or wrong fields');
  if (!b64ok(kdf.salt) || Buffer.from(String(kdf.salt), 'base64').length < 16) throw badSlot(name, 'bad salt');
  if (kdf.name === 'scrypt') checkScrypt(kdf as { N: unknown; r: unknown; p: unknown }, name);
  else if (kdf.name !== 'hkdf-sha256') throw badSlot(name, `unknown key derivation "${String(kdf.name).slice(0, 20)}"`);
  if (!b64ok(raw.nonce, nacl.secretbox.nonceLength) || !b64ok(raw.wrapped, 32 + nacl.secretbox.overheadLength)) throw badSlot(name, 'bad nonce or wrapped key');
  return raw as unknown as KeySlot;
}

export function createSlot(id: number, type: SlotType, secret: Uint8Array, masterKey: Uint8Array, scrypt: ScryptParams = calibrateScrypt()): KeySlot {
  const salt = b64(randomBytes(32));
  const kdf: KeySlot['kdf'] = type === 'passphrase' ? { name: 'scrypt', salt, ...scrypt } : { name: 'hkdf-sha256', salt };
  const nonce = randomBytes(nacl.secretbox.nonceLength);
  const kek = deriveKek({ kdf }, secret);
  const wrapped = nacl.secretbox(masterKey, nonce, kek);
  return { format: 1, id, type, created: new Date().toISOString(), kdf, nonce: b64(nonce), wrapped: b64(wrapped) };
}

/** The master key if `secret` opens `slot`, else null. */
export function openSlot(slot: KeySlot, secret: Uint8Array): Uint8Array | null {
  const kek = deriveKek(slot, secret, slot.id);
  return nacl.secretbox.open(unb64(slot.wrapped), unb64(slot.nonce), kek);
}

/**
 * Every master key `secret` opens, with its slot: normally one. During a master-key rotation that was
 * interrupted, the same secret may open an old slot (old master key) and a new one; the caller keeps the
 * one whose master key opens the keyring.
 */
export function unlockMasterKeys(slots: KeySlot[], type: SlotType, secret: Uint8Array): { masterKey: Uint8Array; slot: number }[] {
  const candidates = slots.filter((s) => s.type === type);
  if (candidates.length === 0) {
    throw new KeyError(`The repository has no ${type} key slot; use ${type === 'keyfile' ? 'a passphrase' : '--key-file'} instead.`);
  }
  const out: { masterKey: Uint8Array; slot: number }[] = [];
  for (const slot of candidates) {
    const master = openSlot(slot, secret);
    if (master) out.push({ masterKey: master, slot: slot.id });
  }
  if (out.length === 0) throw new KeyError(type === 'passphrase' ? "Wrong passphrase: it opens none of the repository's key slots." : "Wrong key file: it opens none of the repository's key slots.");
  return out;
}

export function newMasterKey(): Uint8Array {
  return new Uint8Array(randomBytes(32));
}

export function newKeyring(repository: RepositoryBinding): Keyring {
  return {
    format: KEYRING_FORMAT,
    generation: 1,
    repository,
    macKey: new Uint8Array(randomBytes(32)),
    currentKeyId: 1,
    dataKeys: new Map([[1, new Uint8Array(randomBytes(32))]]),
  };
}

interface KeyringJson {
  format: number;
  generation?: number;
  repository?: RepositoryBinding;
  mac_key: string;
  current_key_id: number;
  data_keys: Record<string, string>;
}

export function serializeKeyring(k: Keyring): Buffer {
  const json: KeyringJson = {
    format: KEYRING_FORMAT,
    generation: k.generation,
    ...(k.repository ? { repository: k.repository } : {}),
    mac_key: b64(k.macKey),
    current_key_id: k.currentKeyId,
    data_keys: Object.fromEntries([...k.dataKeys].map(([id, key]) => [String(id), b64(key)])),
  };
  return Buffer.from(JSON.stringify(json));
}

/** Parses a keyring, checking every field (it may come from an unencrypted, editable object). */
export function parseKeyring(data: Uint8Array): Keyring {
  let json: KeyringJson;
  try {
    json = JSON.parse(Buffer.from(data).toString('utf8')) as KeyringJson;
  } catch {
    throw new IntegrityError('The keyring (keys/keyring) is damaged: not JSON (was it replaced?).');
  }
  if (typeof json !== 'object' || json === null) throw new IntegrityError('The keyring (keys/keyring) is damaged.');
  if (typeof json.format === 'number' && json.format > KEYRING_FORMAT) {
    throw new FormatError(`The keyring has format ${json.format}, newer than this blocksafe understands (${KEYRING_FORMAT}); use a newer blocksafe.`);
  }
  const key = (s: unknown) => (typeof s === 'string' && Buffer.from(s, 'base64').length === 32 ? unb64(s) : null);
  const mac = key(json.mac_key);
  const keys = json.data_keys && typeof json.data_keys === 'object' ? Object.entries(json.data_keys).map(([id, k]) => [Number(id), key(k)] as const) : [];
  const current = json.current_key_id;
  if (
    (json.format !== 1 && json.format !== 2) ||
    !mac ||
    keys.some(([id, k]) => !k || !Number.isInteger(id) || id < 1 || id > 0xffffffff) ||
    !Number.isInteger(current) ||
    !keys.some(([id]) => id === current)
  ) {
    throw new IntegrityError('The keyring (keys/keyring) is damaged or malformed; the repository cannot be opened.');
  }
  const r = json.repository;
  const binding =
    r &&
    typeof r === 'object' &&
    typeof r.id === 'string' &&
    typeof r.encryption === 'string' &&
    typeof r.block_size === 'number' &&
    typeof r.compression === 'string' &&
    typeof r.compression_level === 'number'
      ? { id: r.id, encryption: r.encryption, block_size: r.block_size, compression: r.compression, compression_level: r.compression_level }
      : null;
  if (json.format === 2 && !binding) throw new IntegrityError('The keyring (keys/keyring) is damaged: its repository binding is missing.');
  return {
    format: json.format,
    generation: Number.isInteger(json.generation) ? json.generation! : 0,
    repository: binding,
    macKey: mac,
    currentKeyId: current,
    dataKeys: new Map(keys.map(([id, k]) => [id, k!])),
  };
}

/** The keyring sealed under the master key (secretbox: nonce ‖ box). */
export function sealKeyring(k: Keyring, masterKey: Uint8Array): Buffer {
  const nonce = randomBytes(nacl.secretbox.nonceLength);
  return Buffer.concat([nonce, nacl.secretbox(serializeKeyring(k), nonce, masterKey)]);
}

/** The keyring, or null when this master key does not open it. */
export function openKeyring(sealed: Uint8Array, masterKey: Uint8Array): Keyring | null {
  const n = nacl.secretbox.nonceLength;
  if (sealed.length < n + nacl.secretbox.overheadLength) return null;
  const plain = nacl.secretbox.open(sealed.subarray(n), sealed.subarray(0, n), masterKey);
  return plain ? parseKeyring(plain) : null;
}
