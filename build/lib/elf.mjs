/**
 * The C library an ELF file needs: the highest GLIBC_x.y and GLIBCXX_x.y.z symbol versions it references
 * (its .gnu.version_r section, what `objdump -p` lists under "Version References"). The dynamic loader
 * refuses a file whose versions the system's libc.so.6 / libstdc++.so.6 lack, so the highest GLIBC_ version
 * of the node binary and of every embedded addon is the oldest glibc the single executable runs on.
 */
import { readFileSync } from 'node:fs';

const SHT_GNU_VERNEED = 0x6ffffffe;

/** Compares dotted versions numerically ("2.28" < "2.34", "3.4.9" < "3.4.21"). */
export function compareVersions(a, b) {
  const x = a.split('.').map(Number);
  const y = b.split('.').map(Number);
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0);
    if (d) return d;
  }
  return 0;
}

/** { glibc: '2.28' | undefined, glibcxx: '3.4.21' | undefined, needed: ['GLIBC_2.2.5', ...] } of an x86-64 ELF file. */
export function symbolVersionNeeds(file) {
  const b = readFileSync(file);
  if (b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 || b[5] !== 1) throw new Error(`${file} is not a 64-bit little-endian ELF file`);
  const shoff = Number(b.readBigUInt64LE(0x28));
  const shentsize = b.readUInt16LE(0x3a);
  const shnum = b.readUInt16LE(0x3c);
  const sections = [];
  for (let i = 0; i < shnum; i++) {
    const o = shoff + i * shentsize;
    sections.push({
      type: b.readUInt32LE(o + 4),
      offset: Number(b.readBigUInt64LE(o + 0x18)),
      size: Number(b.readBigUInt64LE(o + 0x20)),
      link: b.readUInt32LE(o + 0x28),
      info: b.readUInt32LE(o + 0x2c),
    });
  }
  const needed = new Set();
  for (const s of sections.filter((x) => x.type === SHT_GNU_VERNEED)) {
    const strtab = sections[s.link];
    const str = (off) => {
      const start = strtab.offset + off;
      return b.toString('latin1', start, b.indexOf(0, start));
    };
    let vn = s.offset;
    for (let n = 0; n < s.info; n++) {
      const cnt = b.readUInt16LE(vn + 2);
      let vna = vn + b.readUInt32LE(vn + 8);
      for (let j = 0; j < cnt; j++) {
        needed.add(str(b.readUInt32LE(vna + 8)));
        vna += b.readUInt32LE(vna + 12);
      }
      const next = b.readUInt32LE(vn + 12);
      if (!next) break;
      vn += next;
    }
  }
  const highest = (prefix) =>
    [...needed]
      .filter((v) => v.startsWith(prefix) && /^[0-9.]+$/.test(v.slice(prefix.length)))
      .map((v) => v.slice(prefix.length))
      .sort(compareVersions)
      .at(-1);
  return { glibc: highest('GLIBC_'), glibcxx: highest('GLIBCXX_'), needed: [...needed].sort() };
}
