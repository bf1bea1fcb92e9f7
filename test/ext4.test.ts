import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import {
  attachLoop,
  backupJson,
  haveCommand,
  initKeyFileRepo,
  loopDevicesWork,
  makeImage,
  MiB,
  prngBytes,
  run,
  runOk,
  runStatus,
  sha256,
  sha256File,
  tempDir,
  textBytes,
  testIf,
  zeroFile,
  type RepoFixture,
} from './helpers.js';

const haveE2fs = ['mkfs.ext4', 'e2fsck', 'debugfs'].every(haveCommand);
const fsTest = testIf(haveE2fs);
const loopTest = testIf(haveE2fs && loopDevicesWork());

/** The files put into the filesystem: random and text data, nested directories, an empty file. */
const FILES: Record<string, Buffer> = {
  'random.bin': prngBytes('ext4', 'random.bin', 3 * MiB + 4321),
  'notes/readme.txt': textBytes('ext4', 'readme', 200_000),
  'notes/deep/log.txt': textBytes('ext4', 'log', 1_500_000),
  'notes/deep/small.bin': prngBytes('ext4', 'small', 777),
  'twice/a.bin': prngBytes('ext4', 'same', 2 * MiB),
  'twice/b.bin': prngBytes('ext4', 'same', 2 * MiB),
  empty: Buffer.alloc(0),
};

/** Builds a 32 MiB ext4 image from a directory tree (mkfs.ext4 -d, no root or mount needed). */
async function makeExt4(dir: string, name: string): Promise<string> {
  const src = path.join(dir, `${name}-tree`);
  for (const [rel, data] of Object.entries(FILES)) {
    await fs.mkdir(path.dirname(path.join(src, rel)), { recursive: true });
    await fs.writeFile(path.join(src, rel), data);
  }
  const img = path.join(dir, `${name}.img`);
  await run('mkfs.ext4', ['-q', '-F', '-d', src, '-E', 'root_owner=0:0', img, '32M']);
  return img;
}

/** e2fsck -fn: exits 0 only for a clean filesystem (read-only check). */
async function assertFsck(t: import('ava').ExecutionContext, device: string): Promise<void> {
  const r = await runStatus('e2fsck', ['-fn', device]);
  t.is(r.code, 0, `e2fsck -fn ${device}: ${r.stdout}${r.stderr}`);
}

/** Every file, extracted with debugfs (works on an image file or an unmounted device), equals the original. */
async function assertFilesByDebugfs(t: import('ava').ExecutionContext, device: string, outDir: string): Promise<void> {
  await fs.mkdir(outDir, { recursive: true });
  for (const [rel, data] of Object.entries(FILES)) {
    const out = path.join(outDir, rel.replaceAll('/', '__'));
    await run('debugfs', ['-R', `dump /${rel} ${out}`, device]);
    const got = await fs.readFile(out).catch(() => undefined);
    t.truthy(got, `debugfs extracted /${rel}`);
    if (got) t.is(sha256(got), sha256(data), `/${rel} equal`);
  }
}

async function restoreTo(repo: RepoFixture, id: string, target: string, extra: string[] = []): Promise<void> {
  await runOk(['restore', ...repo.args, id, target, ...extra], { env: repo.env });
}

fsTest('an ext4 image (mkfs.ext4 -d) backed up and restored to a file: e2fsck clean and files equal', async (t) => {
  const dir = await tempDir(t);
  const img = await makeExt4(dir, 'fs');
  await assertFsck(t, img);
  const imgHash = await sha256File(img);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const v = await backupJson(repo, img, 'ext4vol');
  t.is(v.size, 32 * MiB);
  t.true(v.stats.blocks_sparse > 0, 'the unused part of the filesystem is sparse');

  const out = path.join(dir, 'restored.img');
  await restoreTo(repo, v.id, out);
  t.is(await sha256File(out), imgHash);
  await assertFsck(t, out);
  await assertFilesByDebugfs(t, out, path.join(dir, 'dump'));

  // A second backup after changing one file stores only the blocks that changed.
  const tree = path.join(dir, 'fs-tree');
  await fs.writeFile(path.join(tree, 'notes/readme.txt'), textBytes('ext4', 'readme-v2', 200_000));
  const img2 = path.join(dir, 'fs2.img');
  await fs.copyFile(img, img2);
  await run('debugfs', ['-w', '-R', `rm /notes/readme.txt`, img2]);
  await run('debugfs', ['-w', '-R', `write ${path.join(tree, 'notes/readme.txt')} /notes/readme.txt`, img2]);
  await assertFsck(t, img2);
  const v2 = await backupJson(repo, img2, 'ext4vol');
  t.true(v2.stats.blocks_written <= 3, `only changed blocks written (${v2.stats.blocks_written})`);
  t.true(v2.stats.blocks_deduplicated >= 1);
  const out2 = path.join(dir, 'restored2.img');
  await restoreTo(repo, v2.id, out2);
  t.is(await sha256File(out2), await sha256File(img2));
  await assertFsck(t, out2);
  const dumped = path.join(dir, 'readme-v2.txt');
  await run('debugfs', ['-R', `dump /notes/readme.txt ${dumped}`, out2]);
  t.deepEqual(await fs.readFile(dumped), textBytes('ext4', 'readme-v2', 200_000));
});

loopTest('ext4 on loop devices: backup from a device, restore to a larger device, mount and compare', async (t) => {
  const dir = await tempDir(t);
  const img = await makeExt4(dir, 'dev');
  const imgHash = await sha256File(img);
  const source = await attachLoop(t, img);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const v = await backupJson(repo, source, 'loopvol');
  t.is(v.size, 32 * MiB, 'size from the kernel');
  t.is(v.source, source);

  // Target: a zero-filled device larger than the version (it counts as empty, no --force needed).
  const targetFile = path.join(dir, 'target.bin');
  await zeroFile(targetFile, 40 * MiB);
  const target = await attachLoop(t, targetFile);
  await restoreTo(repo, v.id, target);
  t.is(await sha256File(target, { start: 0, length: v.size }), imgHash);
  await assertFsck(t, target);

  const mnt = path.join(dir, 'mnt');
  await fs.mkdir(mnt);
  if ((await runStatus('mount', ['-o', 'ro', target, mnt])).code === 0) {
    t.teardown(async () => void (await runStatus('umount', [mnt])));
    for (const [rel, data] of Object.entries(FILES)) {
      t.is(sha256(await fs.readFile(path.join(mnt, rel))), sha256(data), `/${rel} equal through the mount`);
    }
  } else {
    t.log('mount failed; comparing the files with debugfs instead');
    await assertFilesByDebugfs(t, target, path.join(dir, 'dump'));
  }
});

loopTest('block devices: size from the kernel for a source not a multiple of the block size; --sparse restore', async (t) => {
  const dir = await tempDir(t);
  // 2 full 4 MiB blocks and 7 sectors: a loop device exposes whole sectors, so the kernel size equals the file size.
  const img = await makeImage(path.join(dir, 'raw.img'), { blocks: ['text', 'zero', 'random'], tail: { bytes: 7 * 512, kind: 'text' }, seed: 'loop' });
  const source = await attachLoop(t, img.path);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const v = await backupJson(repo, source, 'raw');
  t.is(v.size, img.size);
  t.like(v.stats, { blocks_sparse: 1, blocks_read: 3 });

  // Restore to a file and to a fresh zeroed device with --sparse (zero blocks skipped, device already zeros).
  const out = path.join(dir, 'out.img');
  await restoreTo(repo, v.id, out);
  t.is(await sha256File(out), img.sha256);
  const targetFile = path.join(dir, 'target.bin');
  await zeroFile(targetFile, img.size);
  const target = await attachLoop(t, targetFile);
  await restoreTo(repo, v.id, target, ['--sparse']);
  t.is(await sha256File(target), img.sha256);
});
