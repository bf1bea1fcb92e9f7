#!/usr/bin/env node
// Per-block CPU cost of each step of the block pipeline, the old way (allocate, transfer) and the current
// way (arena slots, reused zstd contexts), on 4 MiB blocks of an image made by mkimage.py. CPU time
// (user + sys of this process, all threads) per block, so that a loaded machine does not decide.
//
//   node bench/blockcost.mjs IMAGE [ITERATIONS]     (after npm run build; see docs/PERFORMANCE.md)
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { Worker } from 'node:worker_threads';
import { constants as zc, zstdCompressSync } from 'node:zlib';

const dist = new URL('../dist/src/', import.meta.url);
const { encodeObject, encodeBlockInPlace, decodeObject, decodeBlockInPlace, ObjectType } = await import(new URL('codec/object.js', dist));
const { ZstdWorkspace, zstdBound } = await import(new URL('codec/zstdWorkspace.js', dist));
const { isAllZero, blockChecksum } = await import(new URL('codec/checksum.js', dist));
const { Arena, BLOCK_AT } = await import(new URL('engine/arena.js', dist));
const { DirectoryStore } = await import(new URL('store/directory.js', dist));

const [image, itArg] = process.argv.slice(2);
if (!image) {
  console.error('usage: node bench/blockcost.mjs IMAGE [ITERATIONS]');
  process.exit(2);
}
const N = Number(itArg ?? 20);
const BS = 4 * 1024 * 1024;
const LEVEL = 1; // the default compression level of new repositories
const fd = fs.openSync(image, 'r');

/** The first block of each kind in the image: all zeros, text-like (compressible), random. */
function findBlocks() {
  const found = {};
  const buf = Buffer.allocUnsafe(BS);
  const size = fs.fstatSync(fd).size;
  for (let off = 0; off + BS <= size && Object.keys(found).length < 3; off += BS) {
    fs.readSync(fd, buf, 0, BS, off);
    if (isAllZero(buf)) found.zero ??= off;
    else {
      let printable = 0;
      for (let i = 0; i < BS; i += 997) if (buf[i] >= 32 && buf[i] < 127) printable++;
      if (printable > 0.98 * (BS / 997)) found.text ??= off;
      else if (printable < 0.5 * (BS / 997)) found.random ??= off;
    }
  }
  return found;
}
const where = findBlocks();
const read = (off) => {
  const b = Buffer.allocUnsafeSlow(BS);
  fs.readSync(fd, b, 0, BS, off);
  return b;
};
const blocks = { zero: read(where.zero), text: read(where.text), random: read(where.random) };

const macKey = randomBytes(32);
const keys = { currentKeyId: 1, dataKeys: new Map([[1, randomBytes(32)]]) };
const context = randomBytes(32);

function cpu(fn, n = N) {
  fn(); // warm up
  const t = process.cpuUsage();
  for (let i = 0; i < n; i++) fn();
  const d = process.cpuUsage(t);
  return (d.user + d.system) / n; // µs per call
}
async function cpuAsync(fn, n = N) {
  await fn();
  const t = process.cpuUsage();
  for (let i = 0; i < n; i++) await fn();
  const d = process.cpuUsage(t);
  return (d.user + d.system) / n;
}

const rows = [];
const row = (step, kind, old, now) => rows.push({ step, kind, old_us: Math.round(old), now_us: now === null ? null : Math.round(now) });

// read: old = O_DIRECT-style read into a bounce slot, then a copy into a pooled transferable buffer
const arena = new Arena(Arena.slotSizeFor(BS), 4);
const slot0 = arena.view(0, BS);
const slot1 = arena.view(1);
const pooled = Buffer.allocUnsafeSlow(BS);
row(
  'read (page cache)',
  'text',
  cpu(() => {
    fs.readSync(fd, slot0, 0, BS, where.text);
    slot0.copy(pooled);
  }),
  cpu(() => fs.readSync(fd, slot0, 0, BS, where.text)),
);

row(
  'zero detection',
  'zero',
  cpu(() => isAllZero(blocks.zero)),
  cpu(() => isAllZero(blocks.zero)),
);
row(
  'checksum (HMAC-SHA-256)',
  'text',
  cpu(() => blockChecksum(macKey, blocks.text)),
  cpu(() => blockChecksum(macKey, blocks.text)),
);

const ws = new ZstdWorkspace(LEVEL, BS);
const scratch = Buffer.allocUnsafeSlow(zstdBound(BS));
const oneShot = (b) => zstdCompressSync(b, { params: { [zc.ZSTD_c_compressionLevel]: LEVEL }, pledgedSrcSize: b.length, chunkSize: b.length + (b.length >>> 7) + 128 * 1024 });
row(
  `zstd -${LEVEL} compress`,
  'text',
  cpu(() => oneShot(blocks.text)),
  cpu(() => ws.compressInto(blocks.text, scratch)),
);

for (const kind of ['text', 'random']) {
  const opts = { type: ObjectType.Block, compress: true, zstdLevel: LEVEL, context };
  // encodeBlockInPlace destroys the block: it is copied into its slot again each time (counted, ~0.3 ms)
  row(
    'seal (compress + encrypt + frame)',
    kind,
    cpu(() => encodeObject(blocks[kind], keys, opts)),
    cpu(() => (blocks[kind].copy(slot1, BLOCK_AT), encodeBlockInPlace(slot1, BLOCK_AT, BS, keys, opts, ws, scratch))),
  );
  const obj = encodeObject(blocks[kind], keys, opts);
  const raw = arena.view(2);
  // decodeBlockInPlace decrypts in place: the object is copied into its slot again each time (counted, ~0.3 ms)
  row(
    'open (decrypt + decompress)',
    kind,
    cpu(() => decodeObject(obj, keys, context, { maxPlain: BS })),
    cpu(() => (obj.copy(raw), decodeBlockInPlace(raw, obj.length, BS, keys, context, ws, scratch))),
  );
}

// main thread <-> worker: a 4 MiB block transferred there and back vs. a slot number
const echo = new Worker(
  `const { parentPort } = require('node:worker_threads');
   parentPort.on('message', (m) => parentPort.postMessage(m, m.data ? [m.data] : []));`,
  { eval: true },
);
let ab = new ArrayBuffer(BS);
const roundTrip = (msg, transfer) =>
  new Promise((resolve) => {
    echo.once('message', resolve);
    echo.postMessage(msg, transfer);
  });
const oldRt = await cpuAsync(async () => {
  const r = await roundTrip({ data: ab }, [ab]);
  ab = r.data;
});
const newRt = await cpuAsync(() => roundTrip({ slot: 1, length: BS }, []));
row('worker round trip', 'any', oldRt, newRt);
await echo.terminate();

// store put: one object file (tmp + rename), from a fresh buffer vs. from the arena slot
const dir = fs.mkdtempSync('/dev/shm/blockcost-');
const store = new DirectoryStore(dir);
const sealed = encodeObject(blocks.random, keys, { type: ObjectType.Block, compress: true, zstdLevel: LEVEL, context });
let k = 0;
const oldPut = await cpuAsync(() => store.put(`data/00/${String(k++).padStart(64, '0')}`, Buffer.from(sealed)), 8);
sealed.copy(slot1);
const newPut = await cpuAsync(() => store.put(`data/00/${String(k++).padStart(64, '0')}`, slot1.subarray(0, sealed.length)), 8);
row('store put (tmpfs)', 'random', oldPut, newPut);
fs.rmSync(dir, { recursive: true, force: true });

console.log(`CPU µs per 4 MiB block (${N} iterations, zstd level ${LEVEL}, load ${fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')})`);
console.log('| step | block | before | after |');
console.log('|---|---|---:|---:|');
for (const r of rows) console.log(`| ${r.step} | ${r.kind} | ${r.old_us} | ${r.now_us ?? '-'} |`);
