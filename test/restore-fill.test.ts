/**
 * Damaged ranges of an INVALID version: `restore --fill-from VERSION` takes the block at the same offset
 * from another version where that one is intact; elsewhere they read as zeros, never as the target's old
 * data. Exit code 3 either way (what was restored is not all of the version), every range reported.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test from 'ava';
import { backupJson, flipBit, initKeyFileRepo, listObjects, makeImage, MiB, readRange, runCli, sha256, tempDir } from './helpers.js';

test('restore --fill-from takes a damaged block from another version; without it the range reads as zeros', async (t) => {
  const dir = await tempDir(t, 'blocksafe-fill-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const a = await makeImage(path.join(dir, 'a.img'), { blockSize: MiB, seed: 'fill-a', blocks: ['random', 'text', 'random'] });
  const b = await makeImage(path.join(dir, 'b.img'), { blockSize: MiB, seed: 'fill-b', blocks: ['random', 'text', 'random'] });
  const vb = await backupJson(repo, b.path, 'vol');
  const before = new Set(await listObjects(repo.dir));
  const va = await backupJson(repo, a.path, 'vol');
  const aObjects = (await listObjects(repo.dir)).filter((o) => !before.has(o));
  t.is(aObjects.length, 3, 'precondition: a shares no block with b');
  // Damage every object of a except one: at least the first block is damaged whichever object it is.
  for (const o of aObjects.slice(0, 2)) {
    const file = path.join(repo.dir, o);
    await flipBit(file, Math.floor((await fs.stat(file)).size / 2));
  }
  const blockOf = async (file: string, i: number) => sha256(await readRange(file, i * MiB, MiB));

  const filled = path.join(dir, 'filled.img');
  await fs.writeFile(filled, Buffer.alloc(3 * MiB, 0xab));
  let r = await runCli(['restore', ...repo.args, '--force', '--fill-from', vb.id, '--json', va.id, filled], { env: repo.env });
  t.is(r.code, 3, r.stderr);
  const out = JSON.parse(r.stdout) as { damaged: { offset: number; length: number; reason: string }[] };
  t.is(out.damaged.length >= 1, true);
  const damagedBlocks = new Set(out.damaged.flatMap((d) => Array.from({ length: d.length / MiB }, (_, k) => d.offset / MiB + k)));
  for (const d of out.damaged) t.regex(d.reason, new RegExp(`\\(filled from version ${vb.id}\\)$`));
  for (let i = 0; i < 3; i++) {
    t.is(await blockOf(filled, i), await blockOf(damagedBlocks.has(i) ? b.path : a.path, i), `block ${i} from ${damagedBlocks.has(i) ? 'the other version' : 'its own version'}`);
  }

  const zeroed = path.join(dir, 'zeroed.img');
  await fs.writeFile(zeroed, Buffer.alloc(3 * MiB, 0xab));
  r = await runCli(['restore', ...repo.args, '--force', va.id, zeroed], { env: repo.env });
  t.is(r.code, 3, r.stderr);
  t.regex(r.stderr, /DAMAGED range\(s\), which read as zeros:/);
  for (let i = 0; i < 3; i++) {
    const data = await readRange(zeroed, i * MiB, MiB);
    if (damagedBlocks.has(i))
      t.true(
        data.every((x) => x === 0),
        `damaged block ${i} reads as zeros`,
      );
    else t.is(sha256(data), await blockOf(a.path, i));
  }

  // A version of another block size, or the version itself, cannot fill.
  r = await runCli(['restore', ...repo.args, '--force', '--fill-from', va.id, va.id, zeroed], { env: repo.env });
  t.is(r.code, 2, r.stderr);
  t.regex(r.stderr, /cannot fill damaged ranges/);
});
