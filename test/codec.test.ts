import { spawnSync } from 'node:child_process';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import test from 'ava';
import { blockChecksum, CHECKSUM_BYTES, isAllZero } from '../src/codec/checksum.js';
import { createSlot, newKeyring, newMasterKey, openKeyring, openSlot, sealKeyring, unlockMasterKeys, type ScryptParams } from '../src/codec/keys.js';
import { Cipher, Compression, decodeObject, encodeObject, MAX_PLAIN, objectKeyId, ObjectType, zstdDeclaredSize, type CodecKeys } from '../src/codec/object.js';
import { FormatError, IntegrityError, KeyError } from '../src/errors.js';
import { backupJson, initRepo, listObjects, prngBytes, ROOT, runCli, tempDir, textBytes } from './helpers.js';

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
  const both: CodecKeys = {
    currentKeyId: 2,
    dataKeys: new Map([
      [1, keys.dataKeys.get(1)!],
      [2, k2],
    ]),
  };
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

// ---- zstd: node:zlib (no addon), frames of older versions, and bombs (issue 14, item 8) ----

test('objects compressed by zstd-napi (blocksafe 0.1.0) decode with node:zlib', (t) => {
  // test/fixtures/zstd: a level-1 frame written by zstd-napi 0.0.13 before blocksafe dropped the addon.
  const frame = fs.readFileSync(path.join(ROOT, 'test', 'fixtures', 'zstd', 'zstd-napi-0.0.13-level1.zst'));
  let text = '';
  for (let i = 0; i < 20000; i++) text += `blocksafe object written by zstd-napi 0.0.13, line ${i}\n`;
  const header = Buffer.from([...Buffer.from('BSOB'), 1, ObjectType.Block, Compression.Zstd, Cipher.None, 0, 0, 0, 0]);
  const plain = decodeObject(Buffer.concat([header, frame]), plainKeys).plain;
  t.is(plain.length, 1128890);
  t.is(createHash('sha256').update(plain).digest('hex'), 'be6514e2402778789ce826ae79683bc001322ddeebc0aed577a2413c3a56eaa4');
  t.is(plain.toString(), text);
});

test('frames written now declare their content size (what decoding checks before allocating)', (t) => {
  for (const size of [1000, 70_000, 1 << 20]) {
    const obj = encodeObject(TEXT.subarray(0, size), plainKeys, { type: ObjectType.Block, compress: true, zstdLevel: 1 });
    t.is(obj[6], Compression.Zstd);
    t.is(zstdDeclaredSize(obj.subarray(HEADER)), size);
    t.true(decodeObject(obj, plainKeys, undefined, { maxPlain: size }).plain.equals(TEXT.subarray(0, size)));
    t.throws(() => decodeObject(obj, plainKeys, undefined, { maxPlain: size - 1 }), { instanceOf: IntegrityError, message: /claims to decompress to/ });
  }
  t.throws(() => zstdDeclaredSize(Buffer.from('not zstd')), { instanceOf: IntegrityError });
});

/**
 * A zstd frame of `blocks` RLE blocks of 128 KiB each (4 bytes apiece): 8192 blocks = a 32 KiB frame that
 * expands to 1 GiB. `declare` writes an 8-byte content size into the header; `windowLog` sets the window
 * descriptor (the decoder allocates the window before the first block).
 */
function zstdBomb(blocks: number, opts: { declare?: bigint; windowLog?: number } = {}): Buffer {
  const parts: Buffer[] = [];
  const magic = Buffer.alloc(4);
  magic.writeUInt32LE(0xfd2fb528);
  parts.push(magic);
  const fcs = opts.declare !== undefined;
  parts.push(Buffer.from([(fcs ? 3 << 6 : 0) | 0 /* not single segment, no checksum, no dictionary */]));
  parts.push(Buffer.from([((opts.windowLog ?? 17) - 10) << 3]));
  if (fcs) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(opts.declare!);
    parts.push(b);
  }
  const RLE = 1;
  const size = 128 * 1024;
  for (let i = 0; i < blocks; i++) {
    const last = i === blocks - 1 ? 1 : 0;
    const h = last | (RLE << 1) | (size << 3);
    parts.push(Buffer.from([h & 0xff, (h >> 8) & 0xff, (h >> 16) & 0xff, 0x41]));
  }
  return Buffer.concat(parts);
}

const bombObject = (frame: Buffer) => Buffer.concat([Buffer.from([...Buffer.from('BSOB'), 1, ObjectType.Block, Compression.Zstd, Cipher.None, 0, 0, 0, 0]), frame]);

test('the bomb frame is real: node:zlib alone inflates 32 KiB to 1 GiB', (t) => {
  const frame = zstdBomb(8192);
  t.true(frame.length <= 33 * 1024, `${frame.length} bytes`);
  // 64 MiB of it (512 blocks) is enough to show what the unchecked decoder did.
  t.is(zlib.zstdDecompressSync(zstdBomb(512)).length, 64 * 1024 * 1024);
});

test('a zstd bomb is refused fast with an IntegrityError: expanding, claiming, or asking for a huge window', (t) => {
  const cases: Array<[string, Buffer, RegExp]> = [
    ['expands to 1 GiB without declaring it', zstdBomb(8192), /more than the 4194304 bytes/],
    ['declares 1 TiB', zstdBomb(8192, { declare: 1n << 40n }), /claims to decompress to 1099511627776 bytes/],
    ['declares 2^64-1', zstdBomb(4, { declare: (1n << 64n) - 1n }), /claims to decompress/],
    ['declares 1 MiB but expands to 1 GiB', zstdBomb(8192, { declare: 1n << 20n }), /does not decompress|more than/],
    ['asks for a 128 MiB window (zstd allows that much by default)', zstdBomb(4, { windowLog: 27 }), /does not decompress/],
  ];
  for (const [label, frame, message] of cases) {
    // CPU time, not wall-clock time: a loaded machine does not change it (expanding 1 GiB takes seconds of it).
    const cpu = process.cpuUsage();
    const before = process.memoryUsage().arrayBuffers;
    t.throws(() => decodeObject(bombObject(frame), plainKeys, undefined, { maxPlain: 4 * 1024 * 1024 }), { instanceOf: IntegrityError, message }, label);
    const used = process.cpuUsage(cpu);
    const ms = (used.user + used.system) / 1000;
    t.true(ms < 1000, `${label}: ${ms.toFixed(0)} ms of CPU`);
    t.true(process.memoryUsage().arrayBuffers - before < 64 * 1024 * 1024, label);
  }
  // Without a caller's bound, a block object is still bounded by the largest block size.
  t.throws(() => decodeObject(bombObject(zstdBomb(8192)), plainKeys), { instanceOf: IntegrityError, message: new RegExp(`more than the ${MAX_PLAIN[ObjectType.Block]} bytes`) });
});

/** Runs `cmd` and returns its exit status, output and peak RSS (python3's getrusage of its children). */
function withPeakRss(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}) {
  const py =
    'import resource,subprocess,sys\nr=subprocess.run(sys.argv[1:])\nsys.stderr.write("\\nPEAK_RSS_KB=%d\\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(r.returncode)';
  const r = spawnSync('python3', ['-c', py, cmd, ...args], { encoding: 'utf8', cwd: opts.cwd, env: opts.env, timeout: 120_000 });
  const m = /PEAK_RSS_KB=(\d+)/.exec(r.stderr);
  if (!m) throw new Error(`no peak RSS from python3 (needed for this test): ${r.error?.message ?? ''}${r.stderr}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr.replace(/\nPEAK_RSS_KB=\d+\n/, ''), peakMiB: Number(m[1]) / 1024 };
}

test('restore of a repository holding a 32 KiB zstd bomb as a block: exit 3, the range reported, memory bounded', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const source = path.join(dir, 'source.img');
  fs.writeFileSync(source, Buffer.concat([TEXT, TEXT.subarray(0, 1 << 19)]).subarray(0, 1 << 20));
  const v = await backupJson(repo, source, 'vol');
  const objects = await listObjects(repo.dir);
  t.is(objects.length, 1);
  fs.writeFileSync(path.join(repo.dir, objects[0]!), bombObject(zstdBomb(8192)));
  const env = { ...process.env, NODE_OPTIONS: '' };
  const r = withPeakRss(process.execPath, [path.join(ROOT, 'bin', 'blocksafe.js'), 'restore', ...repo.args, v.id, path.join(dir, 'out.img')], { cwd: ROOT, env });
  t.log(`restore with the bomb: exit ${r.status}, peak RSS ${r.peakMiB.toFixed(0)} MiB`);
  t.is(r.status, 3, r.stderr);
  t.regex(r.stderr, /more than the 1048576 bytes|damaged/);
  t.true(r.peakMiB < 300, `peak RSS ${r.peakMiB.toFixed(0)} MiB (the unchecked decoder needed more than 1 GiB)`);
  // Sanity: the CLI itself still works on this repository.
  t.is((await runCli(['ls', ...repo.args, '--json'])).code, 0);
});
