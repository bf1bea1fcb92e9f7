import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import test from 'ava';
import {
  backupJson,
  initKeyFileRepo,
  initRepo,
  listObjects,
  makeImage,
  MiB,
  readRange,
  runCli,
  runJson,
  runOk,
  sha256File,
  tempDir,
  type ImageLayout,
  type RepoFixture,
  type VersionJson,
} from './helpers.js';

/**
 * 7 blocks of 4 MiB and a partial tail (29.2 MiB): two zero blocks, two duplicates of earlier blocks, so
 * 4 distinct non-zero blocks (random, text, text, tail) must be stored.
 */
const MIXED: ImageLayout = {
  blocks: ['random', 'zero', 'text', { dup: 0 }, 'zero', { dup: 2 }, 'text'],
  tail: { bytes: 1_234_567, kind: 'random' },
  seed: 'roundtrip',
};
const ZERO_BYTES = 2 * 4 * MiB;

async function restoreTo(repo: RepoFixture, version: string, target: string, extra: string[] = []): Promise<void> {
  await runOk(['restore', ...repo.args, version, target, ...extra], { env: repo.env });
}

/** The shortest prefix of `id` that no other id starts with. */
function uniquePrefix(id: string, all: string[]): string {
  for (let n = 1; n <= id.length; n++) {
    const p = id.slice(0, n);
    if (all.filter((o) => o !== id).every((o) => !o.startsWith(p))) return p;
  }
  return id;
}

test('mixed image: round trip, dedup within and across versions, zero blocks not stored, holes on restore', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'disk.img'), MIXED);
  t.not(img.size % (4 * MiB), 0, 'size is not a multiple of the block size');
  const repo = await initRepo(path.join(dir, 'repo'));

  const v1 = await backupJson(repo, img.path, 'disk');
  t.is(v1.size, img.size);
  t.is(v1.block_size, 4 * MiB);
  t.true(v1.complete);
  t.true(v1.valid);
  t.like(v1.stats, {
    blocks_read: 6,
    blocks_written: 4,
    blocks_deduplicated: 2,
    blocks_sparse: 2,
    bytes_read: img.size - ZERO_BYTES,
    bytes_deduplicated: 2 * 4 * MiB,
    bytes_sparse: ZERO_BYTES,
    blocks_referenced: 0,
  });
  t.true(v1.stats.bytes_written > 0);

  // Duplicated blocks stored once, zero blocks not at all.
  const objects = await listObjects(repo.dir);
  t.is(objects.length, 4, `objects: ${objects.join(', ')}`);
  for (const o of objects) t.regex(o, /^data\/([0-9a-f]{2})\/\1[0-9a-f]{62}$/);
  let stored = 0;
  for (const o of objects) stored += (await fs.stat(path.join(repo.dir, o))).size;
  t.is(v1.stats.bytes_written, stored, 'bytes_written counts the stored object bytes');
  t.true(stored < img.size - ZERO_BYTES - 2 * 4 * MiB, 'text blocks were compressed');
  // Names are keyed checksums: they are not the plain sha256 of any block.
  const names = new Set(objects.map((o) => path.basename(o)));
  for (const h of img.blockHashes) t.false(names.has(h));
  // Encrypted: no plaintext of a text block appears in any object.
  const textSample = await readRange(img.path, 2 * 4 * MiB + 1000, 64);
  const randomSample = await readRange(img.path, 1000, 64);
  for (const o of objects) {
    const raw = await fs.readFile(path.join(repo.dir, o));
    t.is(raw.indexOf(textSample), -1);
    t.is(raw.indexOf(randomSample), -1);
  }

  // Restore to a new file: same bytes, zero blocks are holes.
  const out1 = path.join(dir, 'restored1.img');
  await restoreTo(repo, v1.id, out1);
  t.is(await sha256File(out1), img.sha256);
  const st = await fs.stat(out1);
  t.is(st.size, img.size);
  const srcAllocated = (await fs.stat(img.path)).blocks * 512;
  const allocated = st.blocks * 512;
  t.true(srcAllocated >= img.size - 64 * 1024, `the source is fully allocated (${srcAllocated} of ${img.size})`);
  t.true(allocated <= img.size - ZERO_BYTES + 256 * 1024, `restored file allocates ${allocated} bytes; ${ZERO_BYTES} of ${img.size} should be holes`);

  // A second backup of the same data writes nothing new.
  const v2 = await backupJson(repo, img.path, 'disk');
  t.not(v2.id, v1.id);
  t.like(v2.stats, { blocks_written: 0, bytes_written: 0, blocks_read: 6, blocks_deduplicated: 6, blocks_sparse: 2 });
  t.deepEqual(await listObjects(repo.dir), objects, 'data/ unchanged');
  const out2 = path.join(dir, 'restored2.img');
  await restoreTo(repo, v2.id, out2);
  t.is(await sha256File(out2), img.sha256);

  const stats = await runJson<{ repository: Record<string, number>; versions: { id: string }[] }>(['stats', ...repo.args], { env: repo.env });
  t.like(stats.repository, { versions: 2, versions_incomplete: 0, versions_invalid: 0, blocks: 4, blocks_invalid: 0, stored_bytes: stored, logical_bytes: 2 * img.size });
  t.deepEqual(stats.versions.map((v) => v.id).sort(), [v1.id, v2.id].sort());
});

test('a second volume sharing blocks with the first stores only its new blocks', async (t) => {
  const dir = await tempDir(t);
  const a = await makeImage(path.join(dir, 'a.img'), { blocks: ['random', 'text', 'random'], seed: 'share' });
  // b: block 0 and 1 equal a's, block 2 new, and a tail.
  const b = await makeImage(path.join(dir, 'b.img'), { blocks: ['random', 'text', 'text'], tail: { bytes: 4096, kind: 'text' }, seed: 'share' });
  t.is(a.blockHashes[0], b.blockHashes[0]);
  t.is(a.blockHashes[1], b.blockHashes[1]);
  t.not(a.blockHashes[2], b.blockHashes[2]);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const va = await backupJson(repo, a.path, 'a');
  t.is(va.stats.blocks_written, 3);
  const vb = await backupJson(repo, b.path, 'b');
  t.like(vb.stats, { blocks_written: 2, blocks_deduplicated: 2 });
  t.is((await listObjects(repo.dir)).length, 5);
  for (const [v, img] of [
    [va, a],
    [vb, b],
  ] as const) {
    const out = path.join(dir, `${v.name}.out`);
    await restoreTo(repo, v.id, out);
    t.is(await sha256File(out), img.sha256);
  }
});

test('ls --json lists versions with the documented fields; dates carry the UTC offset', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'small.img'), { blocks: [], tail: { bytes: 100_000, kind: 'text' }, seed: 'ls' });
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const before = Date.now();
  const v1 = await backupJson(repo, img.path, 'vol1', ['-s', 'nightly-1', '-t', 'keep', '-t', 'b_daily']);
  const v2 = await backupJson(repo, img.path, 'vol2');
  const after = Date.now();

  const all = await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env });
  t.true(Array.isArray(all));
  t.deepEqual(all.map((v) => v.id).sort(), [v1.id, v2.id].sort());
  const e1 = all.find((v) => v.id === v1.id)!;
  for (const key of ['id', 'name', 'snapshot_name', 'date', 'size', 'block_size', 'valid', 'complete', 'protected', 'tags']) {
    t.true(key in e1, `field ${key}`);
  }
  t.like(e1, { name: 'vol1', snapshot_name: 'nightly-1', size: img.size, block_size: 4 * MiB, valid: true, complete: true, protected: false });
  // The given tags, plus any automatic b_daily/b_weekly/b_monthly tags.
  t.true(e1.tags.includes('keep') && e1.tags.includes('b_daily'), `tags ${e1.tags}`);
  t.deepEqual(
    e1.tags.filter((x) => !/^b_(daily|weekly|monthly)$/.test(x)),
    ['keep'],
  );
  t.regex(e1.id, /^[a-z0-9]{4,}$/);
  t.regex(e1.date, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d)$/);
  const when = Date.parse(e1.date);
  t.true(when >= before - 2000 && when <= after + 2000, `date ${e1.date} is about now`);
  const e2 = all.find((v) => v.id === v2.id)!;
  t.like(e2, { name: 'vol2', snapshot_name: '' });
  t.deepEqual(
    e2.tags.filter((x) => !/^b_(daily|weekly|monthly)$/.test(x)),
    [],
  );

  // Filter by name.
  const only1 = await runJson<VersionJson[]>(['ls', 'vol1', ...repo.args], { env: repo.env });
  t.deepEqual(
    only1.map((v) => v.id),
    [v1.id],
  );
  t.deepEqual(await runJson(['ls', 'nothing-like-this', ...repo.args], { env: repo.env }), []);

  // Local time with the offset of the zone: the same instant in another zone.
  const kolkata = await runJson<VersionJson[]>(['ls', 'vol1', ...repo.args], { env: { ...repo.env, TZ: 'Asia/Kolkata' } });
  t.regex(kolkata[0]!.date, /\+05:30$/);
  t.is(Date.parse(kolkata[0]!.date), Date.parse(e1.date));
  const utc = await runJson<VersionJson[]>(['ls', 'vol1', ...repo.args], { env: { ...repo.env, TZ: 'UTC' } });
  t.regex(utc[0]!.date, /\+00:00$/);
  t.is(Date.parse(utc[0]!.date), Date.parse(e1.date));

  // The table form shows the id and the name.
  const table = await runOk(['ls', ...repo.args], { env: repo.env });
  t.true(table.stdout.includes(v1.id) && table.stdout.includes('vol1') && table.stdout.includes('nightly-1'));
});

test('a unique prefix of a version id works for show and restore', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'p.img'), { blocks: ['text'], tail: { bytes: 777, kind: 'random' }, seed: 'prefix' });
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) ids.push((await backupJson(repo, img.path, `v${i}`)).id);
  t.is(new Set(ids).size, 3);
  for (const id of ids) {
    const p = uniquePrefix(id, ids);
    t.true(p.length < id.length, `prefix ${p} of ${id}`);
    const shown = await runJson<VersionJson>(['show', p, ...repo.args]);
    t.is(shown.id, id);
    t.is(shown.size, img.size);
    t.is(typeof shown.stats.blocks_written, 'number');
  }
  // ls lists newest first.
  const listed = await runJson<VersionJson[]>(['ls', ...repo.args]);
  t.deepEqual([...listed.map((v) => v.id)].sort(), [...ids].sort());
  for (let i = 1; i < listed.length; i++) t.true(Date.parse(listed[i - 1]!.date) >= Date.parse(listed[i]!.date), 'newest first');
  const target = path.join(dir, 'out.img');
  await restoreTo(repo, uniquePrefix(ids[1]!, ids), target);
  t.is(await sha256File(target), img.sha256);
  // show without --json prints the id and the local date with its offset.
  const shown = await runOk(['show', ids[0]!, ...repo.args], { env: { TZ: 'Asia/Kolkata' } });
  t.true(shown.stdout.includes(ids[0]!));
  t.regex(shown.stdout, /\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+05:30/);
});

test('--encryption none repository round trips (file:// source), including empty and tiny images', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'n.img'), { blocks: ['text', 'zero', 'random'], tail: { bytes: 3, kind: 'text' }, seed: 'none' });
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const descriptor = JSON.parse(await fs.readFile(path.join(repo.dir, 'blocksafe.json'), 'utf8'));
  t.is(descriptor.encryption, 'none');
  t.deepEqual(
    (await fs.readdir(path.join(repo.dir, 'keys'))).filter((f) => f.startsWith('slot-')),
    [],
    'no key slots',
  );
  const v = await backupJson(repo, pathToFileURL(img.path).href, 'plain');
  t.is(v.size, img.size);
  t.like(v.stats, { blocks_written: 3, blocks_sparse: 1 });
  const out = path.join(dir, 'out.img');
  await restoreTo(repo, v.id, out);
  t.is(await sha256File(out), img.sha256);

  for (const size of [0, 1]) {
    const src = path.join(dir, `size${size}.img`);
    await fs.writeFile(src, Buffer.alloc(size, 0x41));
    const vs = await backupJson(repo, src, `s${size}`);
    t.is(vs.size, size);
    const o = path.join(dir, `size${size}.out`);
    await restoreTo(repo, vs.id, o);
    t.deepEqual(await fs.readFile(o), Buffer.alloc(size, 0x41));
  }
});

test('a key-file repository round trips', async (t) => {
  const dir = await tempDir(t);
  const keyFile = path.join(dir, 'key');
  await fs.writeFile(keyFile, randomBytes(64), { mode: 0o600 });
  const img = await makeImage(path.join(dir, 'k.img'), { blocks: ['random', 'text', { dup: 1 }], tail: { bytes: 65536, kind: 'zero' }, seed: 'keyfile' });
  const repo = await initRepo(path.join(dir, 'repo'), { keyFile });
  const slots = (await fs.readdir(path.join(repo.dir, 'keys'))).filter((f) => f.startsWith('slot-'));
  t.is(slots.length, 1);
  const slot = JSON.parse(await fs.readFile(path.join(repo.dir, 'keys', slots[0]!), 'utf8'));
  t.is(slot.type, 'keyfile');
  const v = await backupJson(repo, img.path, 'keyed');
  t.like(v.stats, { blocks_written: 2, blocks_deduplicated: 1, blocks_sparse: 1 });
  const out = path.join(dir, 'out.img');
  await restoreTo(repo, v.id, out);
  t.is(await sha256File(out), img.sha256);
  // A passphrase does not open it, and another key file neither.
  const r = await runCli(['ls', '--repo', repo.dir], { env: { BLOCKSAFE_PASSPHRASE: 'anything' } });
  t.is(r.code, 1);
  t.regex(r.stderr, /^blocksafe: .*key.file/i);
  const otherKey = path.join(dir, 'other.key');
  await fs.writeFile(otherKey, randomBytes(64));
  const r2 = await runCli(['ls', '--repo', repo.dir, '--key-file', otherKey]);
  t.is(r2.code, 1);
  t.regex(r2.stderr, /^blocksafe: Wrong key file/);
});

test('a 1 MiB block-size repository round trips, with a zero partial tail', async (t) => {
  const dir = await tempDir(t);
  const img = await makeImage(path.join(dir, 'm.img'), {
    blockSize: MiB,
    blocks: ['text', 'zero', 'random', { dup: 0 }, 'zero', 'text', 'random'],
    tail: { bytes: 300_001, kind: 'zero' },
    seed: 'onemeg',
  });
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const descriptor = JSON.parse(await fs.readFile(path.join(repo.dir, 'blocksafe.json'), 'utf8'));
  t.is(descriptor.block_size, MiB);
  const v = await backupJson(repo, img.path, 'small-blocks');
  t.is(v.block_size, MiB);
  t.is(v.size, img.size);
  t.like(v.stats, { blocks_written: 4, blocks_deduplicated: 1, blocks_sparse: 3, bytes_sparse: 2 * MiB + 300_001 });
  t.is((await listObjects(repo.dir)).length, 4);
  const out = path.join(dir, 'out.img');
  await restoreTo(repo, v.id, out);
  t.is(await sha256File(out), img.sha256);
  t.is((await fs.stat(out)).size, img.size);
});
