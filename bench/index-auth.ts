/**
 * What authenticating the index costs (docs/SECURITY.md, "the index"): the reads a restore of a 1 TiB volume
 * of 4 MiB blocks makes — 256 block-map chunks of 1024 entries and 262 144 block records — from an LMDB on
 * tmpfs, with the MAC checked (IndexAuth.open, as the index does) and without (the raw value, as schema 2
 * did). Run: node_modules/.bin/node --import=tsx bench/index-auth.ts [blocks]
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import * as path from 'node:path';
import { open } from 'lmdb';
import { IndexAuth } from '../src/index/auth.js';
import { CHUNK_BLOCKS } from '../src/index/blockmap.js';
import { decodeBlockRecord, encodeBlockRecord } from '../src/index/blockRecord.js';

const blocks = Number(process.argv[2] ?? 262_144);
const chunks = Math.ceil(blocks / CHUNK_BLOCKS);
const dir = mkdtempSync(path.join('/dev/shm', 'bench-index-auth-'));
const root = open({ path: path.join(dir, 'index.mdb'), maxDbs: 8, compression: false });
const auth = new IndexAuth(randomBytes(32));
const sealed = root.openDB<Buffer, Buffer>('sealed', { keyEncoding: 'binary', encoding: 'binary' });
const plain = root.openDB<Buffer, Buffer>('plain', { keyEncoding: 'binary', encoding: 'binary' });
const sealedMaps = root.openDB<Buffer, Buffer>('sealed_maps', { keyEncoding: 'binary', encoding: 'binary' });
const plainMaps = root.openDB<Buffer, Buffer>('plain_maps', { keyEncoding: 'binary', encoding: 'binary' });

const checksums = Array.from({ length: blocks }, () => randomBytes(32));
const record = encodeBlockRecord({ size: 4 << 20, stored: 4 << 20, key_id: 1, valid: true, verified: Date.now() });
await root.transaction(() => {
  for (const c of checksums) {
    sealed.put(c, auth.seal('blocks', c, record));
    plain.put(c, record);
  }
  for (let i = 0; i < chunks; i++) {
    const key = Buffer.alloc(4);
    key.writeUInt32BE(i);
    const chunk = Buffer.concat(checksums.slice(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS));
    sealedMaps.put(key, auth.seal('maps', key, chunk));
    plainMaps.put(key, chunk);
  }
});

function pass(withAuth: boolean): number {
  const t0 = process.hrtime.bigint();
  let n = 0;
  for (let i = 0; i < chunks; i++) {
    const key = Buffer.alloc(4);
    key.writeUInt32BE(i);
    const raw = (withAuth ? sealedMaps : plainMaps).get(key)!;
    const chunk = withAuth ? auth.open('maps', key, raw) : raw;
    for (let j = 0; j * 32 < chunk.length; j++) {
      const c = chunk.subarray(j * 32, (j + 1) * 32);
      const r = withAuth ? decodeBlockRecord(auth.open('blocks', c, sealed.get(c)!)) : decodeBlockRecord(Buffer.from(plain.get(c)!));
      n += r.size > 0 ? 1 : 0;
    }
  }
  if (n !== blocks) throw new Error(`read ${n} of ${blocks}`);
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

const runs: { auth: number; plain: number }[] = [];
pass(true);
pass(false); // warm up
for (let i = 0; i < 5; i++) runs.push({ plain: pass(false), auth: pass(true) });
const median = (xs: number[]) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const a = median(runs.map((r) => r.auth));
const p = median(runs.map((r) => r.plain));
console.log(
  JSON.stringify({ blocks, chunks, authenticated_ms: +a.toFixed(1), unauthenticated_ms: +p.toFixed(1), added_ms: +(a - p).toFixed(1), added_us_per_block: +(((a - p) * 1000) / blocks).toFixed(2) }),
);
await root.close();
rmSync(dir, { recursive: true, force: true });
