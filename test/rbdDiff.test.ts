/**
 * The rbd diff stream reader treats its input as untrusted: malformed, truncated, out-of-range and
 * out-of-order streams are refused with a reason; sub-block discards keep the rest of the block.
 */
import test from 'ava';
import { DiffBlocks, type TouchedBlock } from '../src/engine/rbdBlocks.js';
import { ByteReader, RbdDiffReader } from '../src/engine/rbdDiff.js';

const BS = 64 * 1024;

function rec(tag: string, nums: number[], data?: Buffer): Buffer {
  const b = Buffer.alloc(1 + 8 * nums.length);
  b.write(tag, 0, 'latin1');
  nums.forEach((n, i) => b.writeBigUInt64LE(BigInt(n), 1 + 8 * i));
  return data ? Buffer.concat([b, data]) : b;
}

function v1(size: number, ...records: Buffer[]): Buffer {
  return Buffer.concat([Buffer.from('rbd diff v1\n'), rec('s', [size]), ...records]);
}

/** Feeds the stream in small chunks (as a pipe would) and collects every touched block. */
async function blocks(stream: Buffer, size: number, chunk = 1000): Promise<TouchedBlock[]> {
  async function* chunks() {
    for (let i = 0; i < stream.length; i += chunk) yield stream.subarray(i, i + chunk);
  }
  const reader = new RbdDiffReader(new ByteReader(chunks()), size);
  await reader.meta();
  const b = new DiffBlocks(reader, BS, size);
  const out: TouchedBlock[] = [];
  for (let i = 0; i * BS < size; i++) {
    const t = await b.take(i);
    if (t) out.push(t);
  }
  await b.finish();
  return out;
}

test('data and zero records become blocks with their covered ranges; a sub-block discard covers only itself', async (t) => {
  const size = 4 * BS;
  const data = Buffer.alloc(BS + 100, 7);
  const out = await blocks(v1(size, rec('w', [BS - 50, data.length], data), rec('z', [3 * BS + 10, 20]), Buffer.from('e')), size);
  t.deepEqual(
    out.map((b) => [b.index, b.covered, b.full, b.zeroOnly]),
    [
      [0, [[BS - 50, BS]], false, false],
      [1, [[0, BS]], true, false],
      [2, [[0, 50]], false, false],
      [3, [[10, 30]], false, true],
    ],
  );
  t.is(out[0]!.data[BS - 1], 7);
  t.is(out[0]!.data[0], 0);
});

test('v2 streams are read, unknown v2 records skipped', async (t) => {
  const size = BS;
  const body = (tag: string, payload: Buffer) => Buffer.concat([Buffer.from(tag), rec('', [payload.length]).subarray(1), payload]);
  const w = Buffer.concat([rec('', [5, 3]).subarray(1), Buffer.from('abc')]);
  const sizeRec = rec('', [size]).subarray(1);
  const stream = Buffer.concat([Buffer.from('rbd diff v2\n'), body('s', sizeRec), body('X', Buffer.from('ignored')), body('w', w), Buffer.from('e')]);
  const out = await blocks(stream, size, 7);
  t.is(out.length, 1);
  t.is(out[0]!.data.subarray(5, 8).toString(), 'abc');
});

const refusals: [string, () => Buffer, number, RegExp][] = [
  ['a foreign header', () => Buffer.from('not a diff at all\n'), BS, /not an rbd diff/],
  ['a wrong size', () => v1(2 * BS, Buffer.from('e')), BS, /describes an image of 131072 bytes, but the image has 65536/],
  ['an extent beyond the end', () => v1(BS, rec('z', [BS - 10, 11]), Buffer.from('e')), BS, /beyond the end/],
  ['a huge length', () => v1(BS, rec('w', [0, 2 ** 40])), BS, /beyond the end/],
  ['an impossible number', () => v1(BS, rec('w', [2 ** 63, 1])), BS, /impossible offset/],
  ['overlapping extents', () => v1(BS, rec('z', [100, 50]), rec('z', [120, 10]), Buffer.from('e')), BS, /out of order/],
  ['a truncated data record', () => v1(BS, rec('w', [0, 100], Buffer.alloc(40))), BS, /ended in the middle of a data record/],
  ['a missing end record', () => v1(BS, rec('z', [0, 10])), BS, /ended in the middle of a record tag/],
  ['data after the end', () => Buffer.concat([v1(BS, Buffer.from('e')), Buffer.from('junk')]), BS, /data after its end record/],
  ['an unknown v1 tag', () => v1(BS, Buffer.from('q')), BS, /unknown record tag "q"/],
  ['metadata among data records', () => v1(BS, rec('z', [0, 10]), rec('s', [BS])), BS, /unexpected record "s" among its data records/],
  ['an oversized name', () => Buffer.concat([Buffer.from('rbd diff v1\nt'), Buffer.from([0xff, 0xff, 0xff, 0x7f])]), BS, /malformed snapshot name/],
];
for (const [what, make, size, pattern] of refusals) {
  test(`refused: ${what}`, async (t) => {
    await t.throwsAsync(() => blocks(make(), size), { message: pattern });
  });
}
