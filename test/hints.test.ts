/**
 * Unit tests of the hints parser and the per-block verdicts (src/engine/hints.ts): what an rbd-diff style
 * hints file may contain, and which blocks a backup must read, may mark sparse unread, or may take from
 * the base version.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import test from 'ava';
import { UsageError } from '../src/errors.js';
import { blockHints, parseHints, readHintsFile, type Extent } from '../src/engine/hints.js';

const K = 1024;
const M = 1024 * K;

const ext = (offset: number, length: number, exists = true): Extent => ({ offset, length, exists });
const asObject = (m: Map<number, string>) => Object.fromEntries([...m.entries()].sort((a, b) => a[0] - b[0]));

// ------------------------------------------------------------------------------------------ parseHints

test('parseHints: rbd-diff strings and JSON booleans', (t) => {
  const text = JSON.stringify([
    { offset: 0, length: 65536, exists: 'true' },
    { offset: 4194304, length: 4096, exists: 'false' },
    { offset: 8388608, length: 1, exists: true },
    { offset: 9 * M, length: 0, exists: false },
  ]);
  t.deepEqual(parseHints(text, 'h.json'), [ext(0, 65536, true), ext(4194304, 4096, false), ext(8388608, 1, true), ext(9 * M, 0, false)]);
});

test('parseHints: an empty array is valid (nothing changed)', (t) => {
  t.deepEqual(parseHints('[]\n', 'h.json'), []);
});

test('parseHints: extra fields are ignored, whitespace and a trailing newline are fine', (t) => {
  t.deepEqual(parseHints(' [ {"offset": 5, "length": 7, "exists": "true", "note": "x"} ]\n\n', 'h.json'), [ext(5, 7, true)]);
});

test('parseHints: truncated JSON is a usage error naming the file and suggesting truncation', (t) => {
  const full = JSON.stringify([
    { offset: 0, length: 65536, exists: 'true' },
    { offset: 1048576, length: 65536, exists: 'true' },
  ]);
  for (const cut of [1, 10, full.length - 1, Math.floor(full.length / 2)]) {
    const err = t.throws(() => parseHints(full.slice(0, cut), '/tmp/x.hints'), { instanceOf: UsageError });
    t.is(err?.exitCode, 2);
    t.regex(err!.message, /\/tmp\/x\.hints/);
    t.regex(err!.message, /not valid JSON/);
    t.regex(err!.message, /truncated/);
  }
  t.throws(() => parseHints('', 'empty.json'), { instanceOf: UsageError, message: /empty\.json.*not valid JSON/ });
});

test('parseHints: not an array', (t) => {
  for (const text of ['{}', '{"offset":0,"length":1,"exists":"true"}', '42', '"x"', 'null']) {
    t.throws(() => parseHints(text, 'h.json'), { instanceOf: UsageError, message: /h\.json/ }, text);
  }
});

test('parseHints: bad entries are refused with their index and the reason', (t) => {
  const cases: [unknown, RegExp][] = [
    [null, /entry 1: not an object/],
    ['x', /entry 1: not an object/],
    [{ length: 1, exists: 'true' }, /entry 1: "offset"/],
    [{ offset: -1, length: 1, exists: 'true' }, /entry 1: "offset" must be a non-negative integer/],
    [{ offset: 1.5, length: 1, exists: 'true' }, /entry 1: "offset"/],
    [{ offset: '4096', length: 1, exists: 'true' }, /entry 1: "offset"/],
    [{ offset: 2 ** 60, length: 1, exists: 'true' }, /entry 1: "offset"/],
    [{ offset: 0, exists: 'true' }, /entry 1: "length"/],
    [{ offset: 0, length: -5, exists: 'true' }, /entry 1: "length" must be a non-negative integer/],
    [{ offset: 0, length: 1 }, /entry 1: "exists"/],
    [{ offset: 0, length: 1, exists: 'yes' }, /entry 1: "exists" must be "true" or "false"/],
    [{ offset: 0, length: 1, exists: 1 }, /entry 1: "exists"/],
  ];
  for (const [bad, re] of cases) {
    const text = JSON.stringify([{ offset: 0, length: 1, exists: 'true' }, bad]);
    const err = t.throws(() => parseHints(text, 'h.json'), { instanceOf: UsageError }, text);
    t.regex(err!.message, re, text);
    t.regex(err!.message, /h\.json/);
  }
});

test('readHintsFile: a missing file is a clear error naming it; a present file is parsed', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'blocksafe-hints-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const missing = path.join(dir, 'nope.json');
  t.throws(() => readHintsFile(missing), { message: /nope\.json.*does not exist/ });
  const ok = path.join(dir, 'ok.json');
  await writeFile(ok, '[{"offset":4096,"length":4096,"exists":"true"}]\n');
  t.deepEqual(readHintsFile(ok), [ext(4096, 4096, true)]);
});

// ------------------------------------------------------------------------------------------ blockHints

test('blockHints: a changed byte anywhere in a block makes it "read"; extents spanning blocks mark each', (t) => {
  const bs = 1 * M;
  const size = 8 * M;
  const hints = blockHints([ext(0, 1), ext(3 * M - 1, 2), ext(5 * M + 100, 2 * M)], bs, size);
  t.deepEqual(asObject(hints), { 0: 'read', 2: 'read', 3: 'read', 5: 'read', 6: 'read', 7: 'read' });
});

test('blockHints: untouched blocks are absent; zero-length extents touch nothing', (t) => {
  const hints = blockHints([ext(2 * M, 0, true), ext(3 * M, 0, false)], M, 8 * M);
  t.is(hints.size, 0);
});

test('blockHints: a block entirely covered by a discard becomes "zero"', (t) => {
  const hints = blockHints([ext(2 * M, M, false), ext(4 * M, 2 * M, false)], M, 8 * M);
  t.deepEqual(asObject(hints), { 2: 'zero', 4: 'zero', 5: 'zero' });
});

test('blockHints: a partly discarded block must be read ("read", never "zero")', (t) => {
  const hints = blockHints([ext(2 * M, M - 4096, false), ext(3 * M + 4096, M - 4096, false), ext(5 * M + 1, 2 * M, false)], M, 8 * M);
  // 2 and 3: partial; 5: partial (starts 1 byte in), 6: entire, 7: partial (ends 1 byte in)
  t.deepEqual(asObject(hints), { 2: 'read', 3: 'read', 5: 'read', 6: 'zero', 7: 'read' });
});

test('blockHints: several adjacent discards that together cover a block make it "zero"', (t) => {
  const hints = blockHints([ext(M, 256 * K, false), ext(M + 256 * K, 512 * K, false), ext(M + 768 * K, 256 * K, false)], M, 4 * M);
  t.deepEqual(asObject(hints), { 1: 'zero' });
});

test('blockHints: data written into a discarded block wins: "read"', (t) => {
  const both = blockHints([ext(M, M, false), ext(M + 4096, 4096, true)], M, 4 * M);
  t.deepEqual(asObject(both), { 1: 'read' });
  const reversed = blockHints([ext(M + 4096, 4096, true), ext(M, M, false)], M, 4 * M);
  t.deepEqual(asObject(reversed), { 1: 'read' });
});

test('blockHints: overlapping discards of one block are never taken for a full cover they are not', (t) => {
  // Two discards of the same first half: 1 MiB "covered" in sum, but the second half was not discarded.
  const hints = blockHints([ext(M, 512 * K, false), ext(M, 512 * K, false)], M, 4 * M);
  t.not(hints.get(1), 'zero');
  t.is(hints.get(1), 'read');
});

test('blockHints: extents past the end of the volume are clipped', (t) => {
  const bs = M;
  const size = 4 * M;
  const hints = blockHints([ext(3 * M + 512 * K, 4 * M, true), ext(6 * M, M, true), ext(10 * M, 5 * M, false)], bs, size);
  t.deepEqual(asObject(hints), { 3: 'read' });
  for (const b of hints.keys()) t.true(b * bs < size, `block ${b} lies past the end`);
});

test('blockHints: a discard running past the end covers the last block entirely', (t) => {
  const hints = blockHints([ext(3 * M, 10 * M, false)], M, 4 * M);
  t.deepEqual(asObject(hints), { 3: 'zero' });
});

test('blockHints: the partial last block counts as covered when its real bytes are all discarded', (t) => {
  // volume of 3.5 blocks: the last block has 512 KiB
  const size = 3 * M + 512 * K;
  t.deepEqual(asObject(blockHints([ext(3 * M, 512 * K, false)], M, size)), { 3: 'zero' });
  t.deepEqual(asObject(blockHints([ext(3 * M, 256 * K, false)], M, size)), { 3: 'read' });
  t.deepEqual(asObject(blockHints([ext(3 * M, M, false)], M, size)), { 3: 'zero' });
});

test("blockHints: an extent that starts past the end, inside the partial last block's nominal range, touches nothing", (t) => {
  // size 3.5 MiB: offsets from 3.5 MiB on do not exist, even though block 3 nominally spans up to 4 MiB.
  const size = 3 * M + 512 * K;
  const hints = blockHints([ext(3 * M + 768 * K, 64 * K, true), ext(3 * M + 600 * K, 64 * K, false)], M, size);
  t.deepEqual(asObject(hints), {});
});

test('blockHints: a discard past the end does not spoil an exact cover of the partial last block', (t) => {
  const size = 3 * M + 512 * K;
  const hints = blockHints([ext(3 * M, 512 * K, false), ext(3 * M + 700 * K, 64 * K, false)], M, size);
  t.deepEqual(asObject(hints), { 3: 'zero' });
});

test('blockHints: memory is per touched block (a huge volume with two extents has two entries)', (t) => {
  const size = 2 ** 50; // 1 PiB
  const hints = blockHints([ext(0, 4096, true), ext(2 ** 49, 4 * M, false)], 4 * M, size);
  t.deepEqual(asObject(hints), { 0: 'read', [2 ** 49 / (4 * M)]: 'zero' });
});

test('blockHints: 64 KiB block size and unaligned extents', (t) => {
  const bs = 64 * K;
  const hints = blockHints([ext(100, 200, true), ext(64 * K - 1, 2, true), ext(3 * 64 * K, 64 * K, false), ext(5 * 64 * K + 1, 64 * K - 1, false)], bs, 10 * bs);
  t.deepEqual(asObject(hints), { 0: 'read', 1: 'read', 3: 'zero', 5: 'read' });
});
