#!/usr/bin/env node
/**
 * zstd in the block pipeline: node:zlib's built-in zstd (Node >= 22.15) against the zstd-napi addon, on the
 * same 4 MiB blocks at the same level, text and random cells of an image made by shared/bench/mkimage.py.
 * The numbers are in docs/BINARY.md ("zstd: node:zlib instead of zstd-napi").
 *
 *   python3 ../shared/bench/mkimage.py gen --out /tmp/z.img --size 256M --seed 7
 *   npm i --no-save zstd-napi@0.0.13        # only for the comparison; blocksafe itself no longer uses it
 *   node bench/zstd.mjs /tmp/z.img [level] [rounds]
 *
 * Every operation runs on one core, one block at a time (as a pipeline worker does), interleaved between the
 * implementations round by round so that the load of a shared machine hits both alike; the median of the
 * rounds is printed in MiB/s of plaintext. "pipeline" is the whole object codec step (compress with the
 * 64 KiB compressibility probe + chacha20-poly1305, and the reverse), as src/codec/object.ts does it.
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as zlib from 'node:zlib';

const [image, levelArg = '1', roundsArg = '7'] = process.argv.slice(2);
if (!image) {
  process.stderr.write('usage: node bench/zstd.mjs IMAGE [level] [rounds]\n');
  process.exit(2);
}
const level = Number(levelArg);
const rounds = Number(roundsArg);
const CELL = 4 << 20;
const manifest = JSON.parse(fs.readFileSync(`${image}.manifest.json`, 'utf8'));
const fd = fs.openSync(image, 'r');
function cells(type, max) {
  const out = [];
  for (const c of manifest.layout) {
    if (c.type !== type || out.length >= max) continue;
    const b = Buffer.alloc(CELL);
    fs.readSync(fd, b, 0, CELL, c.cell * CELL);
    out.push(b);
  }
  return out;
}
const data = { text: cells('text', 8), random: cells('rand', 8) };

const require = createRequire(import.meta.url);
let napi;
try {
  napi = require('zstd-napi');
} catch {
  process.stderr.write('zstd-napi is not installed (npm i --no-save zstd-napi@0.0.13): measuring node:zlib only\n');
}

/** Output room for a one-pass compression (ZSTD_compressBound plus slack): zstd then compresses in one call. */
const bound = (n) => n + (n >> 7) + 131072;
const impls = {
  'node:zlib': {
    // As src/codec/object.ts: content size pledged (written into the frame header), output sized for one pass.
    compress: (b) => zlib.zstdCompressSync(b, { params: { [zlib.constants.ZSTD_c_compressionLevel]: level }, pledgedSrcSize: b.length, chunkSize: bound(b.length) }),
    decompress: (b, size) => zlib.zstdDecompressSync(b, { maxOutputLength: size, chunkSize: size }),
  },
  'node:zlib, default options': {
    compress: (b) => zlib.zstdCompressSync(b, { params: { [zlib.constants.ZSTD_c_compressionLevel]: level } }),
    decompress: (b, size) => zlib.zstdDecompressSync(b, { maxOutputLength: size }),
  },
};
if (napi) {
  impls['zstd-napi'] = {
    compress: (b) => napi.compress(b, { compressionLevel: level }),
    decompress: (b) => napi.decompress(b),
  };
}

const key = randomBytes(32);
function seal(impl, plain) {
  let payload = plain;
  const mid = plain.length >> 1;
  if (impl.compress(plain.subarray(mid, mid + 65536)).length < 65536 * 0.98) {
    const packed = impl.compress(plain);
    if (packed.length < plain.length) payload = packed;
  }
  const nonce = randomBytes(12);
  const c = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: 16 });
  const body = c.update(payload);
  c.final();
  return { nonce, body, tag: c.getAuthTag(), compressed: payload !== plain, size: plain.length };
}
function open(impl, obj) {
  const d = createDecipheriv('chacha20-poly1305', key, obj.nonce, { authTagLength: 16 });
  d.setAuthTag(obj.tag);
  const payload = d.update(obj.body);
  d.final();
  return obj.compressed ? impl.decompress(payload, obj.size) : payload;
}

const MiB = 1 << 20;
const results = {}; // `${kind} ${op} ${impl}` -> MiB/s per round
function time(label, bytes, fn) {
  const t0 = process.hrtime.bigint();
  fn();
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  (results[label] ??= []).push(bytes / MiB / s);
}

const ratio = {};
for (let r = 0; r < rounds + 1; r++) {
  for (const [kind, blocks] of Object.entries(data)) {
    const bytes = blocks.length * CELL;
    // The order of the implementations rotates round by round (the first one in a round measured slower here).
    const entries = Object.entries(impls);
    const rotated = entries.map((_, i) => entries[(i + r) % entries.length]);
    for (const [name, impl] of rotated) {
      let packed;
      time(`${kind}|compress|${name}`, bytes, () => {
        packed = blocks.map((b) => impl.compress(b));
      });
      ratio[`${kind}|${name}`] = bytes / packed.reduce((n, p) => n + p.length, 0);
      time(`${kind}|decompress|${name}`, bytes, () => {
        for (const p of packed) impl.decompress(p, CELL);
      });
      let objs;
      time(`${kind}|pipeline seal|${name}`, bytes, () => {
        objs = blocks.map((b) => seal(impl, b));
      });
      time(`${kind}|pipeline open|${name}`, bytes, () => {
        for (const o of objs) open(impl, o);
      });
    }
  }
  if (r === 0) for (const k of Object.keys(results)) results[k] = []; // first round: warm-up
}

const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
process.stdout.write(`node ${process.versions.node}, zstd level ${level}, ${data.text.length} text + ${data.random.length} random 4 MiB blocks, median of ${rounds} rounds (MiB/s)\n`);
const names = Object.keys(impls);
process.stdout.write(`| data | operation | ${names.join(' | ')} |\n|---|---|${names.map(() => '---|').join('')}\n`);
for (const kind of Object.keys(data)) {
  for (const op of ['compress', 'decompress', 'pipeline seal', 'pipeline open']) {
    process.stdout.write(`| ${kind} | ${op} | ${names.map((n) => median(results[`${kind}|${op}|${n}`]).toFixed(0)).join(' | ')} |\n`);
  }
  process.stdout.write(`| ${kind} | ratio | ${names.map((n) => ratio[`${kind}|${n}`].toFixed(2)).join(' | ')} |\n`);
}
