// Writes a deterministic demo disk image: zero blocks (holes), random blocks, text-like blocks and an
// exact duplicate, with a size that is not a multiple of the block size.
import { createHash } from 'node:crypto';
import { openSync, writeSync, ftruncateSync, closeSync } from 'node:fs';

const [out, mib = '64'] = process.argv.slice(2);
const MiB = 2 ** 20;
const size = Number(mib) * MiB + 12345;
const fd = openSync(out, 'w');
ftruncateSync(fd, size);
function stream(seed, n) {
  const out = Buffer.alloc(n);
  for (let off = 0, i = 0; off < n; off += 32, i++) createHash('sha256').update(`${seed}:${i}`).digest().copy(out, off);
  return out;
}
const words = ['backup', 'restore', 'block', 'volume', 'the', 'of', 'snapshot', 'disk', 'and', 'night'];
function text(seed, n) {
  const r = stream(seed, n / 8);
  let s = '';
  for (let i = 0; s.length < n; i++) s += words[r[i % r.length] % words.length] + (r[i % r.length] % 7 === 0 ? '\n' : ' ');
  return Buffer.from(s.slice(0, n));
}
for (let mb = 0; mb < Number(mib); mb += 4) {
  const kind = (mb / 4) % 4;
  const len = Math.min(4 * MiB, size - mb * MiB);
  if (kind === 0) continue; // zeros: left as a hole
  const data = kind === 1 ? stream(`r${mb}`, len) : kind === 2 ? text(`t${mb}`, len) : stream('r4', len); // kind 3 duplicates block 1
  writeSync(fd, data, 0, len, mb * MiB);
}
writeSync(fd, text('tail', 12345), 0, 12345, size - 12345);
closeSync(fd);
