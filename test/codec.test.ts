import { createHmac, randomBytes } from 'node:crypto';
import test from 'ava';
import { blockChecksum, CHECKSUM_BYTES, isAllZero } from '../src/codec/checksum.js';
import {
  createSlot,
  newKeyring,
  newMasterKey,
  openKeyring,
  openSlot,
  sealKeyring,
  unlockMasterKeys,
  type ScryptParams,
} from '../src/codec/keys.js';
import { Cipher, Compression, decodeObject, encodeObject, objectKeyId, ObjectType, type CodecKeys } from '../src/codec/object.js';
import { FormatError, IntegrityError, KeyError } from '../src/errors.js';
import { prngBytes, textBytes } from './helpers.js';

/** Cheap scrypt for tests (the KDF is the same code path, only cheaper parameters). */
const FAST_SCRYPT: ScryptParams = { N: 2 ** 10, r: 8, p: 1 };
const HEADER = 12;
const NONCE = 12;
const TAG = 16;

const encrypted = (keyId = 1, key: Uint8Array = randomBytes(32)): CodecKeys => ({ currentKeyId: keyId, dataKeys: new Map([[keyId, key]]) });
const plainKeys: CodecKeys = { currentKeyId: 0, dataKeys: new Map() };
const ctx = (s: string) => Buffer.from(s);
/** The master key of the first slot the secret opens. */
const masterOf = (r: { masterKey: Uint8Array }[]): Buffer => Buffer.from(r[0]!.masterKey);
const unlockMasterKey = unlockMasterKeys;
const BINDING = { id: 'test-repo', encryption: 'chacha20-poly1305', block_size: 4194304, compression: 'zstd', compression_level: 1 };

const TEXT = textBytes('codec', 'text', 1 << 20);
const RANDOM = prngBytes('codec', 'random', 1 << 20);

for (const [label, keys] of [
  ['encrypted', encrypted()],
  ['not encrypted', plainKeys],
] as const) {
  const isEnc = keys.dataKeys.size > 0;

  test(`round trip of compressible data, ${label}`, (t) => {
    const obj = encodeObject(TEXT, keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('c') });
    t.true(obj.subarray(0, 4).equals(Buffer.from('BSOB')));
    t.is(obj[4], 1, 'object format');
    t.is(obj[5], ObjectType.Block);
    t.is(obj[6], Compression.Zstd, 'text is stored compressed');
    t.is(obj[7], isEnc ? Cipher.ChaCha20Poly1305 : Cipher.None);
    t.true(obj.length < TEXT.length / 2, `compressed object is much smaller (${obj.length} of ${TEXT.length})`);
    if (isEnc) t.is(obj.indexOf(TEXT.subarray(0, 64)), -1, 'no plaintext visible');
    const dec = decodeObject(obj, keys, ctx('c'));
    t.true(dec.plain.equals(TEXT));
    t.is(dec.type, ObjectType.Block);
    t.is(dec.keyId, isEnc ? 1 : 0);
    t.is(objectKeyId(obj), isEnc ? 1 : 0);
  });

  test(`round trip of incompressible data, ${label}`, (t) => {
    const obj = encodeObject(RANDOM, keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('r') });
    t.is(obj[6], Compression.None, 'random data is stored uncompressed');
    t.is(obj.length, RANDOM.length + HEADER + (isEnc ? NONCE + TAG : 0), 'exact overhead');
    if (isEnc) t.is(obj.indexOf(RANDOM.subarray(0, 64)), -1, 'ciphertext differs from plaintext');
    t.true(decodeObject(obj, keys, ctx('r')).plain.equals(RANDOM));
  });

  test(`round trip without compression and of an empty payload, ${label}`, (t) => {
    const obj = encodeObject(TEXT, keys, { type: ObjectType.Manifest, compress: false, zstdLevel: 1 });
    t.is(obj[6], Compression.None);
    const dec = decodeObject(obj, keys);
    t.is(dec.type, ObjectType.Manifest);
    t.true(dec.plain.equals(TEXT));
    const empty = encodeObject(new Uint8Array(0), keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('e') });
    t.is(decodeObject(empty, keys, ctx('e')).plain.length, 0);
  });
}

test('encryption uses a fresh nonce: the same block encodes differently each time', (t) => {
  const keys = encrypted();
  const a = encodeObject(TEXT, keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('x') });
  const b = encodeObject(TEXT, keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('x') });
  t.false(a.equals(b));
  t.false(a.subarray(HEADER, HEADER + NONCE).equals(b.subarray(HEADER, HEADER + NONCE)));
  t.true(decodeObject(a, keys, ctx('x')).plain.equals(decodeObject(b, keys, ctx('x')).plain));
});

for (const [label, data] of [
  ['compressed', textBytes('codec', 'small', 300)],
  ['uncompressed', prngBytes('codec', 'small', 200)],
] as const) {
  test(`every single flipped bit of an encrypted ${label} object is rejected`, (t) => {
    const keys = encrypted();
    const context = randomBytes(32);
    const obj = encodeObject(data, keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context });
    t.is(obj[6], label === 'compressed' ? Compression.Zstd : Compression.None);
    const notIntegrity: string[] = [];
    for (let byte = 0; byte < obj.length; byte++) {
      for (let bit = 0; bit < 8; bit++) {
        const bad = Buffer.from(obj);
        bad[byte] = bad[byte]! ^ (1 << bit);
        let err: unknown;
        try {
          decodeObject(bad, keys, context);
        } catch (e) {
          err = e;
        }
        if (err === undefined) {
          t.fail(`flipping bit ${bit} of byte ${byte} was not detected`);
          return;
        }
        // A flip in the format or cipher byte can turn it into a value from the future; that is refused
        // as a FormatError (it cannot be told apart from a newer object). Every other flip is an integrity error.
        if (err instanceof IntegrityError) continue;
        if ((byte === 4 || byte === 7) && err instanceof FormatError) continue;
        notIntegrity.push(`byte ${byte} bit ${bit}: ${(err as Error).name}: ${(err as Error).message}`);
      }
    }
    t.deepEqual(notIntegrity, []);
  });
}

test('truncated or extended encrypted objects are rejected', (t) => {
  const keys = encrypted();
  const obj = encodeObject(TEXT.subarray(0, 5000), keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('t') });
  for (const len of [0, 3, HEADER - 1, HEADER, HEADER + NONCE, HEADER + NONCE + TAG - 1, obj.length - 1]) {
    t.throws(() => decodeObject(obj.subarray(0, len), keys, ctx('t')), { instanceOf: IntegrityError }, `truncated to ${len}`);
  }
  t.throws(() => decodeObject(Buffer.concat([obj, Buffer.from([0])]), keys, ctx('t')), { instanceOf: IntegrityError });
});

test('an object decoded under a different context (name) is rejected', (t) => {
  const keys = encrypted();
  const a = blockChecksum(randomBytes(32), Buffer.from('a'));
  const b = Buffer.from(a);
  b[31] = b[31]! ^ 1;
  const obj = encodeObject(TEXT.subarray(0, 1000), keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: a });
  t.true(decodeObject(obj, keys, a).plain.equals(TEXT.subarray(0, 1000)));
  t.throws(() => decodeObject(obj, keys, b), { instanceOf: IntegrityError });
  t.throws(() => decodeObject(obj, keys), { instanceOf: IntegrityError }, 'missing context');
  const noCtx = encodeObject(TEXT.subarray(0, 1000), keys, { type: ObjectType.Manifest, compress: true, zstdLevel: 1 });
  t.throws(() => decodeObject(noCtx, keys, ctx('manifests/abc')), { instanceOf: IntegrityError }, 'context added');
});

test('a wrong data key, an unknown key id and an unencrypted object in an encrypted repository are rejected', (t) => {
  const keys = encrypted(1);
  const obj = encodeObject(TEXT.subarray(0, 1000), keys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('k') });
  t.throws(() => decodeObject(obj, encrypted(1), ctx('k')), { instanceOf: IntegrityError }, 'same id, other key');
  t.throws(() => decodeObject(obj, encrypted(2), ctx('k')), { instanceOf: IntegrityError, message: /unknown key id 1/ });
  const plain = encodeObject(TEXT.subarray(0, 1000), plainKeys, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('k') });
  t.throws(() => decodeObject(plain, keys, ctx('k')), { instanceOf: IntegrityError, message: /not encrypted/ });
  // Key rotation: an object written under key 2 opens with a keyring holding keys 1 and 2.
  const k2 = randomBytes(32);
  const both: CodecKeys = { currentKeyId: 2, dataKeys: new Map([[1, keys.dataKeys.get(1)!], [2, k2]]) };
  const obj2 = encodeObject(TEXT.subarray(0, 1000), both, { type: ObjectType.Block, compress: true, zstdLevel: 1, context: ctx('k') });
  t.is(objectKeyId(obj2), 2);
  t.true(decodeObject(obj, both, ctx('k')).plain.equals(TEXT.subarray(0, 1000)));
  t.true(decodeObject(obj2, both, ctx('k')).plain.equals(TEXT.subarray(0, 1000)));
});

test('an object of a newer format is refused with a message asking for a newer blocksafe', (t) => {
  const keys = plainKeys;
  const obj = encodeObject(Buffer.from('hello'), keys, { type: ObjectType.Block, compress: false, zstdLevel: 1 });
  obj[4] = 2;
  t.throws(() => decodeObject(obj, keys), { instanceOf: FormatError, message: /newer|upgrade/i });
  const bad = Buffer.from(obj);
  bad[0] = 0x58;
  t.throws(() => decodeObject(bad, keys), { instanceOf: IntegrityError }, 'bad magic');
});

test('a passphrase key slot opens with the right passphrase only', (t) => {
  const master = newMasterKey();
  t.is(master.length, 32);
  const slot = createSlot(1, 'passphrase', Buffer.from('right one'), master, FAST_SCRYPT);
  t.is(slot.type, 'passphrase');
  t.is(slot.kdf.name, 'scrypt');
  const json = JSON.stringify(slot);
  t.false(json.includes(Buffer.from(master).toString('base64')), 'master key not stored in clear');
  t.false(json.includes(Buffer.from(master).toString('hex')));
  const opened = openSlot(slot, Buffer.from('right one'));
  t.truthy(opened);
  t.true(Buffer.from(opened!).equals(Buffer.from(master)));
  t.is(openSlot(slot, Buffer.from('right onE')), null);
  t.is(openSlot(slot, Buffer.from('')), null);
  // A slot survives a JSON round trip (it is stored as JSON).
  const reread = JSON.parse(json);
  t.true(masterOf(unlockMasterKey([reread], 'passphrase', Buffer.from('right one'))).equals(Buffer.from(master)));
  t.throws(() => unlockMasterKey([reread], 'passphrase', Buffer.from('wrong')), { instanceOf: KeyError, message: /passphrase/i });
  t.throws(() => unlockMasterKey([reread], 'keyfile', randomBytes(64)), { instanceOf: KeyError, message: /no keyfile key slot/ });
});

test('a key-file slot opens with the right key file only, and any of several slots unlocks', (t) => {
  const master = newMasterKey();
  const keyFile = randomBytes(64);
  const slots = [
    createSlot(1, 'passphrase', Buffer.from('first'), master, FAST_SCRYPT),
    createSlot(2, 'passphrase', Buffer.from('second'), master, FAST_SCRYPT),
    createSlot(3, 'keyfile', keyFile, master),
  ];
  t.is(slots[2]!.kdf.name, 'hkdf-sha256');
  for (const [type, secret] of [
    ['passphrase', Buffer.from('first')],
    ['passphrase', Buffer.from('second')],
    ['keyfile', keyFile],
  ] as const) {
    t.true(masterOf(unlockMasterKey(slots, type, secret)).equals(Buffer.from(master)), `${type} ${secret.length}`);
  }
  const other = Buffer.from(keyFile);
  other[0] = other[0]! ^ 1;
  t.is(openSlot(slots[2]!, other), null);
  t.throws(() => unlockMasterKey(slots, 'keyfile', other), { instanceOf: KeyError, message: /key file/i });
  t.throws(() => unlockMasterKey(slots, 'passphrase', Buffer.from('third')), { instanceOf: KeyError, message: /passphrase/i });
});

test('the keyring is sealed under the master key and opens only with it', (t) => {
  const master = newMasterKey();
  const ring = newKeyring(BINDING);
  const sealed = sealKeyring(ring, master);
  t.is(sealed.indexOf(Buffer.from(ring.macKey)), -1, 'MAC key not in clear');
  const opened = openKeyring(sealed, master)!;
  t.deepEqual(opened.repository, BINDING, 'the keyring authenticates the descriptor fields');
  t.true(Buffer.from(opened.macKey).equals(Buffer.from(ring.macKey)));
  t.is(opened.currentKeyId, ring.currentKeyId);
  t.deepEqual([...opened.dataKeys.keys()], [...ring.dataKeys.keys()]);
  t.true(Buffer.from(opened.dataKeys.get(1)!).equals(Buffer.from(ring.dataKeys.get(1)!)));
  t.is(openKeyring(sealed, newMasterKey()), null, 'another master key does not open it');
  const damaged = Buffer.from(sealed);
  damaged[damaged.length - 1] = damaged[damaged.length - 1]! ^ 0x80;
  t.is(openKeyring(damaged, master), null, 'a damaged keyring does not open');
});

test('block checksum is HMAC-SHA-256 under the repository MAC key', (t) => {
  const key = randomBytes(32);
  const data = TEXT.subarray(0, 100_000);
  const c = blockChecksum(key, data);
  t.is(c.length, CHECKSUM_BYTES);
  t.true(c.equals(createHmac('sha256', key).update(data).digest()));
  t.true(c.equals(blockChecksum(key, Buffer.from(data))), 'deterministic');
  t.false(c.equals(blockChecksum(randomBytes(32), data)), 'keyed: another key gives another identity');
  const changed = Buffer.from(data);
  changed[99_999] = changed[99_999]! ^ 1;
  t.false(c.equals(blockChecksum(key, changed)));
});

test('isAllZero finds a single non-zero byte anywhere, also past the first 64 KiB and in odd sizes', (t) => {
  t.true(isAllZero(new Uint8Array(0)));
  for (const size of [1, 4095, 65536, 65537, 200_001, 4 << 20]) {
    const buf = Buffer.alloc(size);
    t.true(isAllZero(buf), `zeros of ${size}`);
    for (const pos of [0, Math.floor(size / 2), 65536, size - 1]) {
      if (pos >= size) continue;
      buf[pos] = 1;
      t.false(isAllZero(buf), `byte ${pos} of ${size}`);
      t.false(isAllZero(buf.subarray(Math.max(0, pos - 10), pos + 1)), `subarray ending at ${pos}`);
      buf[pos] = 0;
    }
  }
  // A view into a larger buffer only looks at its own bytes.
  const big = Buffer.alloc(1000, 7);
  big.fill(0, 100, 900);
  t.true(isAllZero(big.subarray(100, 900)));
});
