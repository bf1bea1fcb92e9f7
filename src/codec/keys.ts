import { hkdfSync, randomBytes, scryptSync } from 'node:crypto';
import nacl from 'tweetnacl';
import { KeyError } from '../errors.js';

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
/** scrypt cost of new passphrase slots: 32 MiB and ~0.1 s here (restic's choice); slots record their own. */
export const DEFAULT_SCRYPT: ScryptParams = { N: 2 ** 15, r: 8, p: 1 };

export interface KeySlot {
  format: 1;
  id: number;
  type: SlotType;
  created: string;
  kdf: { name: 'scrypt'; salt: string; N: number; r: number; p: number } | { name: 'hkdf-sha256'; salt: string };
  nonce: string;
  wrapped: string;
}

export interface Keyring {
  format: 1;
  macKey: Uint8Array;
  currentKeyId: number;
  dataKeys: Map<number, Uint8Array>;
}

const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64');
const unb64 = (s: string) => new Uint8Array(Buffer.from(s, 'base64'));

function deriveKek(slot: Pick<KeySlot, 'kdf'>, secret: Uint8Array): Uint8Array {
  const salt = Buffer.from(slot.kdf.salt, 'base64');
  if (slot.kdf.name === 'scrypt') {
    const { N, r, p } = slot.kdf;
    return new Uint8Array(scryptSync(secret, salt, 32, { N, r, p, maxmem: 256 * N * r + 16 * 2 ** 20 }));
  }
  return new Uint8Array(hkdfSync('sha256', secret, salt, 'blocksafe key file', 32));
}

export function createSlot(id: number, type: SlotType, secret: Uint8Array, masterKey: Uint8Array, scrypt = DEFAULT_SCRYPT): KeySlot {
  const salt = b64(randomBytes(32));
  const kdf: KeySlot['kdf'] = type === 'passphrase' ? { name: 'scrypt', salt, ...scrypt } : { name: 'hkdf-sha256', salt };
  const nonce = randomBytes(nacl.secretbox.nonceLength);
  const kek = deriveKek({ kdf }, secret);
  const wrapped = nacl.secretbox(masterKey, nonce, kek);
  return { format: 1, id, type, created: new Date().toISOString(), kdf, nonce: b64(nonce), wrapped: b64(wrapped) };
}

/** The master key if `secret` opens `slot`, else null. */
export function openSlot(slot: KeySlot, secret: Uint8Array): Uint8Array | null {
  const kek = deriveKek(slot, secret);
  return nacl.secretbox.open(unb64(slot.wrapped), unb64(slot.nonce), kek);
}

export function unlockMasterKey(slots: KeySlot[], type: SlotType, secret: Uint8Array): { masterKey: Uint8Array; slot: number } {
  const candidates = slots.filter((s) => s.type === type);
  if (candidates.length === 0) {
    throw new KeyError(`The repository has no ${type} key slot; use ${type === 'keyfile' ? 'a passphrase' : '--key-file'} instead.`);
  }
  for (const slot of candidates) {
    const master = openSlot(slot, secret);
    if (master) return { masterKey: master, slot: slot.id };
  }
  throw new KeyError(type === 'passphrase' ? 'Wrong passphrase: it opens none of the repository\'s key slots.' : 'Wrong key file: it opens none of the repository\'s key slots.');
}

export function newMasterKey(): Uint8Array {
  return new Uint8Array(randomBytes(32));
}

export function newKeyring(): Keyring {
  return { format: 1, macKey: new Uint8Array(randomBytes(32)), currentKeyId: 1, dataKeys: new Map([[1, new Uint8Array(randomBytes(32))]]) };
}

interface KeyringJson {
  format: 1;
  mac_key: string;
  current_key_id: number;
  data_keys: Record<string, string>;
}

export function serializeKeyring(k: Keyring): Buffer {
  const json: KeyringJson = {
    format: 1,
    mac_key: b64(k.macKey),
    current_key_id: k.currentKeyId,
    data_keys: Object.fromEntries([...k.dataKeys].map(([id, key]) => [String(id), b64(key)])),
  };
  return Buffer.from(JSON.stringify(json));
}

export function parseKeyring(data: Uint8Array): Keyring {
  const json = JSON.parse(Buffer.from(data).toString('utf8')) as KeyringJson;
  return {
    format: 1,
    macKey: unb64(json.mac_key),
    currentKeyId: json.current_key_id,
    dataKeys: new Map(Object.entries(json.data_keys).map(([id, key]) => [Number(id), unb64(key)])),
  };
}

/** The keyring sealed under the master key (secretbox: nonce ‖ box). */
export function sealKeyring(k: Keyring, masterKey: Uint8Array): Buffer {
  const nonce = randomBytes(nacl.secretbox.nonceLength);
  return Buffer.concat([nonce, nacl.secretbox(serializeKeyring(k), nonce, masterKey)]);
}

export function openKeyring(sealed: Uint8Array, masterKey: Uint8Array): Keyring {
  const n = nacl.secretbox.nonceLength;
  const plain = nacl.secretbox.open(sealed.subarray(n), sealed.subarray(0, n), masterKey);
  if (!plain) throw new KeyError('The keyring does not open with this key slot\'s master key (keyring damaged or replaced).');
  return parseKeyring(plain);
}
