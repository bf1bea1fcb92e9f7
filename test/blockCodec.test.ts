import test from 'ava';
import { randomBytes } from 'node:crypto';
import { constants as zc, zstdCompressSync } from 'node:zlib';
import { decodeBlockInPlace, decodeObject, encodeBlockInPlace, encodeObject, ObjectType, type CodecKeys } from '../src/codec/object.js';
import { zstdBound, ZstdWorkspace } from '../src/codec/zstdWorkspace.js';
import { IntegrityError } from '../src/errors.js';

// The arena pipeline's in-place codec must write and read exactly the object format of encodeObject/decodeObject.
const BS = 256 * 1024;
const HEAD = 4096;
const encrypted: CodecKeys = { currentKeyId: 3, dataKeys: new Map([[3, randomBytes(32)]]) };
const plainKeys: CodecKeys = { currentKeyId: 0, dataKeys: new Map() };
const context = randomBytes(32);
const text = Buffer.from('the quick brown fox jumps over the lazy dog 0123456789\n'.repeat(Math.ceil(BS / 55))).subarray(0, BS);
const blocks = { text, random: randomBytes(BS), short: text.subarray(0, 1000) };
const opts = { type: ObjectType.Block, compress: true, zstdLevel: 1, context };

function sealInPlace(block: Buffer, keys: CodecKeys, ws: ZstdWorkspace): Buffer {
  const mem = Buffer.alloc(HEAD + BS + 8192);
  block.copy(mem, HEAD);
  const [start, length] = encodeBlockInPlace(mem, HEAD, block.length, keys, opts, ws, Buffer.alloc(zstdBound(BS)));
  return Buffer.from(mem.subarray(start, start + length));
}

function openInPlace(object: Buffer, size: number, keys: CodecKeys, ws: ZstdWorkspace): Buffer {
  const mem = Buffer.alloc(BS + 8192);
  object.copy(mem);
  const at = decodeBlockInPlace(mem, object.length, size, keys, context, ws, Buffer.alloc(zstdBound(BS)));
  return Buffer.from(mem.subarray(at, at + size));
}

for (const [name, keys] of [
  ['encrypted', encrypted],
  ['unencrypted', plainKeys],
] as const) {
  test(`${name}: in-place seal and open round trip and agree with encodeObject/decodeObject`, (t) => {
    const ws = new ZstdWorkspace(1, BS);
    for (const [kind, block] of Object.entries(blocks)) {
      const sealed = sealInPlace(block, keys, ws);
      t.deepEqual(decodeObject(sealed, keys, context, { maxPlain: block.length }).plain, block, kind);
      t.deepEqual(openInPlace(sealed, block.length, keys, ws), block, kind);
      t.deepEqual(openInPlace(encodeObject(block, keys, opts), block.length, keys, ws), block, kind);
      // text compresses, random is stored as is
      t.is(sealed[6], kind === 'random' ? 0 : 1, kind);
    }
  });
}

test('open in place refuses a frame of another size, a cut-off frame, altered bytes and a foreign context', (t) => {
  const ws = new ZstdWorkspace(1, BS);
  const sealed = sealInPlace(text, encrypted, ws);
  t.throws(() => openInPlace(sealed, BS - 1, encrypted, ws), { instanceOf: IntegrityError });
  const flipped = Buffer.from(sealed);
  flipped[100] = flipped[100]! ^ 1;
  t.throws(() => openInPlace(flipped, BS, encrypted, ws), { instanceOf: IntegrityError, message: /authentication/ });
  const mem = Buffer.alloc(BS + 8192);
  sealed.copy(mem);
  t.throws(() => decodeBlockInPlace(mem, sealed.length, BS, encrypted, randomBytes(32), ws, Buffer.alloc(zstdBound(BS))), { instanceOf: IntegrityError });
  // unencrypted zstd frames without a declared size: more output than the block is refused, not returned cut off
  const big = zstdCompressSync(Buffer.alloc(2 * BS, 7), { params: { [zc.ZSTD_c_contentSizeFlag]: 0, [zc.ZSTD_c_windowLog]: 18 } });
  const out = Buffer.alloc(BS);
  t.throws(() => ws.decompressInto(big, out), { instanceOf: IntegrityError, message: /more than/ });
  t.throws(() => ws.decompressInto(big.subarray(0, big.length - 3), Buffer.alloc(2 * BS)), { instanceOf: IntegrityError });
  // the workspace keeps working after refusals
  t.deepEqual(openInPlace(sealed, BS, encrypted, ws), text);
});
