/**
 * LVM sources (src/engine/lvm.ts) and thin_delta parsing (src/engine/thinDelta.ts).
 *
 * LVM ITSELF IS SIMULATED in these tests: the kernel of the development and CI machines has no
 * device-mapper, so no logical volume or snapshot can really be created. Instead:
 *  - thin_delta parsing runs on REAL thin_delta output: test/fixtures/lvm/pool-two-nights.xml is turned into
 *    thin pool metadata with the real `thin_restore`, and the real `thin_delta` compares the two snapshots
 *    in it (Debian's thin-provisioning-tools must be installed; .ci/run installs it);
 *  - the command sequence runs against stand-in `lvs`, `lvcreate`, `lvremove`, `lvchange`, `dmsetup` and
 *    `thin_delta` scripts (test/fixtures/lvm/bin, put first on PATH) that keep a fake volume group in a
 *    temporary folder and log every invocation; the stand-in thin_delta runs the real one on that metadata.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { appendFileSync, chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Extent } from '../src/engine/hints.js';
import { ThinDeltaParser, mergeExtents, parseThinDelta, parseThinDeltaDocument } from '../src/engine/thinDelta.js';
import {
  createCommandRunner,
  dmName,
  isBlocksafeSnapshotName,
  lastMeaningfulLine,
  openLvmSource,
  parseLvmUri,
  parseLvs,
  snapshotSizeArgs,
  withLvmSource,
  type OpenLvmOptions,
} from '../src/engine/lvm.js';
import { BlocksafeError, NotFoundError, RefusedError, UsageError } from '../src/errors.js';
import { assertCliError, initRepo, runCli, runJson, tempDir, type VersionJson } from './helpers.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const FIXTURES = join(HERE, 'fixtures', 'lvm');
const BIN = join(FIXTURES, 'bin');
const POOL_XML = join(FIXTURES, 'pool-two-nights.xml');
const KiB64 = 64 * 1024;
const SYSTEM_PATH = `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`;

for (const f of readdirSync(BIN)) chmodSync(join(BIN, f), 0o755); // in case a checkout lost the modes

/** Extents in units of 64 KiB pool blocks, as the fixture's comments describe them. */
const blocks = (list: Array<[number, number, boolean]>): Extent[] => list.map(([b, n, exists]) => ({ offset: b * KiB64, length: n * KiB64, exists }));

/** Night 1 (device 2) → night 2 (device 3) of pool-two-nights.xml. */
const NIGHT1_TO_NIGHT2 = blocks([
  [10, 10, true], // different
  [200, 50, false], // left_only: discarded
  [600, 6, true], // right_only 600..604 + 605 merged
  [710, 20, true], // different 710..719 + right_only 720..729 merged
  [800, 5, true],
  [805, 5, false],
  [1000, 1, true],
]);

// ---------------------------------------------------------------------------------------------------------
// Real thin_restore + thin_delta

function findTool(name: string): string | null {
  for (const dir of `${process.env.PATH ?? ''}:${SYSTEM_PATH}`.split(':')) {
    if (dir && dir !== BIN && existsSync(join(dir, name))) return join(dir, name);
  }
  return null;
}

let metadata: Promise<string> | null = null;
/** Scratch directories of this file, removed when it is done. */
const scratchDirs: string[] = [];
function scratch(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  scratchDirs.push(dir);
  return dir;
}
test.after.always(() => {
  for (const d of scratchDirs) rmSync(d, { recursive: true, force: true });
});

/** Thin pool metadata restored from the XML fixture by the real thin_restore (once per run). */
function poolMetadata(): Promise<string> {
  metadata ??= (async () => {
    const restore = findTool('thin_restore');
    if (!restore || !findTool('thin_delta')) {
      throw new Error('thin-provisioning-tools is not installed (thin_restore/thin_delta not found): install it with `apt-get install thin-provisioning-tools` (.ci/run installs it).');
    }
    const dir = scratch('blocksafe-thin-');
    const meta = join(dir, 'meta.bin');
    writeFileSync(meta, '');
    spawnSync('truncate', ['-s', '8M', meta]);
    const r = spawnSync(restore, ['-i', POOL_XML, '-o', meta], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`thin_restore failed: ${r.stderr || r.error}`);
    return meta;
  })();
  return metadata;
}

async function realThinDelta(args: string[]): Promise<string> {
  const meta = await poolMetadata();
  const r = spawnSync(findTool('thin_delta')!, [...args, meta], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`thin_delta ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

test('real thin_delta output (compact): changed, discarded and merged extents in bytes', async (t) => {
  const xml = await realThinDelta(['--snap1', '2', '--snap2', '3']);
  t.regex(xml, /<different begin="10" length="10"\/>/); // it really is the compact form
  t.deepEqual(parseThinDelta(xml, KiB64), NIGHT1_TO_NIGHT2);
});

test('real thin_delta output (--verbose) parses to the same extents', async (t) => {
  const xml = await realThinDelta(['--verbose', '--snap1', '2', '--snap2', '3']);
  t.regex(xml, /<range begin="10" left_data_begin="10" right_data_begin="200" length="10"\/>/);
  t.deepEqual(parseThinDelta(xml, KiB64), NIGHT1_TO_NIGHT2);
  const doc = parseThinDeltaDocument(xml, KiB64);
  t.is(doc.left, 2);
  t.is(doc.right, 3);
  t.is(doc.dataBlockSizeBytes, KiB64);
});

test('real thin_delta output in the other direction swaps left_only and right_only', async (t) => {
  const expected = blocks([
    [10, 10, true],
    [200, 50, true],
    [600, 6, false],
    [710, 10, true],
    [720, 10, false],
    [800, 10, true], // different 800..804 + right_only 805..809
    [1000, 1, false],
  ]);
  t.deepEqual(parseThinDelta(await realThinDelta(['--snap1', '3', '--snap2', '2']), KiB64), expected);
  t.deepEqual(parseThinDelta(await realThinDelta(['--verbose', '--snap1', '3', '--snap2', '2']), KiB64), expected);
});

test('real thin_delta output: identical devices give no extents; origin vs night 2 only the later write', async (t) => {
  t.deepEqual(parseThinDelta(await realThinDelta(['--snap1', '2', '--snap2', '2']), KiB64), []);
  t.deepEqual(parseThinDelta(await realThinDelta(['--snap1', '3', '--snap2', '1']), KiB64), blocks([[1500, 1, true]]));
});

test('real thin_delta output with a chunk size that disagrees with the metadata is refused', async (t) => {
  const xml = await realThinDelta(['--snap1', '2', '--snap2', '3']);
  const err = t.throws(() => parseThinDelta(xml, 1024 * 1024), { instanceOf: BlocksafeError });
  t.regex(err!.message, /65536 bytes but the pool's chunk size is 1048576 bytes/);
});

// ---------------------------------------------------------------------------------------------------------
// thin_delta parser units

const wrap = (body: string, attrs = '') => `<superblock uuid="" time="1" transaction="1"${attrs}>\n  <diff left="5" right="6">\n${body}  </diff>\n</superblock>\n`;

test('chunk size conversion: 4 MiB chunks beyond 4 GiB stay exact', (t) => {
  const MiB4 = 4 * 1024 * 1024;
  const xml = wrap('    <different begin="300000" length="3"/>\n    <left_only begin="4000000" length="1"/>\n', ' data_block_size="8192"');
  t.deepEqual(parseThinDelta(xml, MiB4), [
    { offset: 300000 * MiB4, length: 3 * MiB4, exists: true },
    { offset: 4000000 * MiB4, length: MiB4, exists: false },
  ]);
  t.is(parseThinDelta(wrap('<right_only begin="1" length="2"/>'), 512)[0]!.offset, 512);
});

test('merging: touching extents of one kind join, gaps and kind changes split, same is dropped', (t) => {
  const xml = wrap(
    [
      '<same begin="0" length="4"/>',
      '<different begin="4" length="2"/>',
      '<right_only begin="6" length="1"/>', // touches → joined
      '<left_only begin="7" length="3"/>', // kind change → new extent
      '<left_only begin="10" length="1"/>', // joined
      '<right_only begin="12" length="1"/>', // gap → new extent
      '<different begin="13" length="0"/>', // empty → ignored
    ].join('\n'),
  );
  t.deepEqual(parseThinDelta(xml, 1024), [
    { offset: 4096, length: 3072, exists: true },
    { offset: 7168, length: 4096, exists: false },
    { offset: 12288, length: 1024, exists: true },
  ]);
});

test('streaming: pushing one character at a time gives the same result; out-of-order ranges are sorted', (t) => {
  const xml = wrap(
    '<right_only>\n<range begin="9" data_begin="1" length="1"/>\n</right_only>\n<different>\n<range begin="2" left_data_begin="0" right_data_begin="3" length="2"/>\n<range begin="4" left_data_begin="5" right_data_begin="7" length="1"/>\n</different>\n',
  );
  const p = new ThinDeltaParser(512);
  for (const ch of xml) p.push(ch);
  const expected = [
    { offset: 1024, length: 1536, exists: true },
    { offset: 4608, length: 512, exists: true },
  ];
  t.deepEqual(p.end().extents, expected);
  t.deepEqual(parseThinDelta(xml, 512), expected);
  t.deepEqual(
    mergeExtents([
      { offset: 0, length: 1, exists: true },
      { offset: 1, length: 1, exists: true },
    ]),
    [{ offset: 0, length: 2, exists: true }],
  );
});

test('bad thin_delta output is refused rather than trusted', (t) => {
  const cases: Array<[string, RegExp]> = [
    ['', /no <diff> element/],
    ['<superblock data_block_size="128">\n  <diff left="1" right="2">\n    <different begin="1" length="1"/>\n', /not closed/],
    [wrap('<different begin="1" length="1"/>').slice(0, 80), /interrupted/],
    [wrap('<changed begin="1" length="1"/>'), /unknown element <changed>/],
    [wrap('<different begin="-1" length="1"/>'), /not a non-negative integer/],
    [wrap('<different length="1"/>'), /without "begin"/],
    [wrap('<range begin="1" length="1"/>'), /<range> outside/],
    [wrap('<same><different begin="1" length="1"/></same>'), /<different> inside <same>/],
  ];
  for (const [xml, re] of cases) {
    const err = t.throws(() => parseThinDelta(xml, 65536), { instanceOf: BlocksafeError }, xml);
    t.regex(err!.message, re);
    t.regex(err!.message, /hints cannot be trusted/);
  }
  t.throws(() => parseThinDelta(wrap(''), 1000), { message: /not a positive multiple of 512/ });
});

// ---------------------------------------------------------------------------------------------------------
// Small pure helpers

test('parseLvmUri accepts lvm://VG/LV and refuses everything else with a UsageError', (t) => {
  t.deepEqual(parseLvmUri('lvm://vg0/home'), { vg: 'vg0', lv: 'home' });
  t.deepEqual(parseLvmUri('lvm://my-vg/root_fs.1+x'), { vg: 'my-vg', lv: 'root_fs.1+x' });
  for (const bad of ['lvm://vg0', 'lvm://vg0/', 'lvm:///home', 'lvm://vg0/a/b', 'lvm:vg0/home', 'file:///dev/sda', 'lvm://vg 0/home', 'lvm://vg0/-x', 'lvm://vg0/..']) {
    const err = t.throws(() => parseLvmUri(bad), { instanceOf: UsageError }, bad);
    t.is(err!.exitCode, 2);
    t.regex(err!.message, /lvm:\/\/VOLUMEGROUP\/VOLUME/);
  }
});

test('helpers: snapshot sizes, dm names, snapshot names, lvs lines, stderr lines', (t) => {
  t.deepEqual(snapshotSizeArgs('5G'), ['--size', '5G']);
  t.deepEqual(snapshotSizeArgs('512m'), ['--size', '512m']);
  t.deepEqual(snapshotSizeArgs('20%origin'), ['--extents', '20%ORIGIN']);
  t.throws(() => snapshotSizeArgs('lots'), { instanceOf: UsageError, message: /10%ORIGIN/ });
  t.throws(() => snapshotSizeArgs('0%FREE'), { instanceOf: UsageError });
  t.is(dmName('my-vg', 'thin-pool'), 'my--vg-thin--pool');
  t.true(isBlocksafeSnapshotName('data', 'data-blocksafe-20240102030405'));
  t.true(isBlocksafeSnapshotName('data', 'data-blocksafe-20240102030405-2'));
  t.false(isBlocksafeSnapshotName('data', 'data-snap'));
  t.false(isBlocksafeSnapshotName('dat.', 'data-blocksafe-20240102030405'));
  t.deepEqual(parseLvs('  data|vg0|Vwi-aotz--|1073741824|[pool]||7|0|/dev/vg0/data\n\n'), [
    { name: 'data', vg: 'vg0', attr: 'Vwi-aotz--', size: 1073741824, pool: 'pool', origin: '', thinId: 7, chunkSize: 0, path: '/dev/vg0/data' },
  ]);
  t.is(lastMeaningfulLine('  Volume group "x" not found\n  Cannot process volume group x\n'), 'Volume group "x" not found');
  t.is(lastMeaningfulLine('no current metadata snap\nUsage: thin_delta [options] <device or file>\nOptions:\n  {-V|--version}\n'), 'no current metadata snap');
  t.is(lastMeaningfulLine("  Insufficient free space\n  Run `lvcreate --help' for more information.\n"), 'Insufficient free space');
});

// ---------------------------------------------------------------------------------------------------------
// Command sequences against the stand-ins

const PREV = 'data-blocksafe-20240101020000';
const NEW = 'data-blocksafe-20240102030405';
const NOW = () => new Date(2024, 0, 2, 3, 4, 5);
const LVS_ARGS = '--noheadings --nosuffix --units b --separator | -o lv_name,vg_name,lv_attr,lv_size,pool_lv,origin,thin_id,chunk_size,lv_path';

interface Sim {
  dir: string;
  opts: OpenLvmOptions;
  warnings: string[];
  calls(): string[];
  lvs(vg?: string): string[];
  read(devicePath: string): string;
  fail(command: string, stderr: string, times?: number): void;
}

/** A fake volume group vg0 (or `vg`) with a classic volume "plain", a thin pool "pool" and a thin volume "data". */
async function makeSim(options: { prev?: string | null; vg?: string; pool?: string; withMeta?: boolean } = {}): Promise<Sim> {
  const vg = options.vg ?? 'vg0';
  const pool = options.pool ?? 'pool';
  const dir = scratch('blocksafe-lvmsim-');
  mkdirSync(join(dir, 'vg', vg), { recursive: true });
  mkdirSync(join(dir, 'dev', vg), { recursive: true });
  mkdirSync(join(dir, 'fail'));
  const lv = (name: string, line: string) => {
    writeFileSync(join(dir, 'vg', vg, name), `${line}\n`);
    writeFileSync(join(dir, 'dev', vg, name), `contents of ${name}\n`);
  };
  lv('plain', '-wi-ao----|1073741824||||0');
  lv(pool, 'twi-aotz--|1073741824||||65536');
  lv('data', `Vwi-aotz--|134217728|${pool}||1|0`); // thin_id 1 = device 1 of the fixture
  if (options.prev !== null) lv(options.prev ?? PREV, `Vri---tz-k|134217728|${pool}|data|2|0`); // device 2
  if (options.withMeta !== false) cpSync(await poolMetadata(), join(dir, 'meta.bin')); // lvcreate makes thin_id 3
  const warnings: string[] = [];
  const run = createCommandRunner({ env: { ...process.env, PATH: `${BIN}:${process.env.PATH ?? SYSTEM_PATH}`, LVM_SIM_DIR: dir } });
  return {
    dir,
    warnings,
    opts: { run, now: NOW, warn: (m) => warnings.push(m), removeRetryDelayMs: 1, deviceWaitMs: 200 },
    calls: () => (existsSync(join(dir, 'calls.log')) ? readFileSync(join(dir, 'calls.log'), 'utf8').trim().split('\n') : []),
    lvs: (v = vg) => readdirSync(join(dir, 'vg', v)).sort(),
    read(devicePath) {
      const text = readFileSync(devicePath, 'utf8');
      appendFileSync(join(dir, 'calls.log'), `READ ${basename(devicePath)}\n`);
      return text;
    },
    fail(command, stderr, times) {
      writeFileSync(join(dir, 'fail', command), stderr);
      const counter = join(dir, 'fail', `${command}.times`);
      if (times !== undefined) writeFileSync(counter, String(times));
      else rmSync(counter, { force: true });
    },
  };
}

test('classic volume: snapshot created, device read, snapshot removed', async (t) => {
  const sim = await makeSim({ withMeta: false }); // no thin volume involved
  const got = await withLvmSource('lvm://vg0/plain', sim.opts, async (src) => {
    t.is(src.kind, 'classic');
    t.is(src.snapshotName, 'plain-blocksafe-20240102030405');
    t.is(src.hints, null);
    t.is(src.baseSnapshot, null);
    t.is(src.size, 1073741824);
    return sim.read(src.devicePath);
  });
  t.is(got, 'contents of plain\n'); // the snapshot is a copy of the origin
  t.deepEqual(sim.calls(), [
    `lvs ${LVS_ARGS} vg0`,
    'lvcreate --snapshot --permission r --extents 10%ORIGIN --name plain-blocksafe-20240102030405 vg0/plain',
    `lvs ${LVS_ARGS} vg0/plain-blocksafe-20240102030405`,
    'READ plain-blocksafe-20240102030405',
    'lvremove -f vg0/plain-blocksafe-20240102030405',
  ]);
  t.deepEqual(sim.lvs(), ['data', PREV, 'plain', 'pool']);
});

test('classic volume: the snapshot is removed even when the backup throws; finish is idempotent', async (t) => {
  const sim = await makeSim({ withMeta: false }); // no thin volume involved
  await t.throwsAsync(
    withLvmSource('lvm://vg0/plain', { ...sim.opts, snapshotSize: '2G' }, async (src) => {
      sim.read(src.devicePath);
      throw new Error('disk full');
    }),
    { message: 'disk full' },
  );
  t.deepEqual(sim.calls().slice(1), [
    'lvcreate --snapshot --permission r --size 2G --name plain-blocksafe-20240102030405 vg0/plain',
    `lvs ${LVS_ARGS} vg0/plain-blocksafe-20240102030405`,
    'READ plain-blocksafe-20240102030405',
    'lvremove -f vg0/plain-blocksafe-20240102030405',
  ]);
  t.false(sim.lvs().includes('plain-blocksafe-20240102030405'));

  // The same with openLvmSource + finish in a finally, called twice.
  const src = await openLvmSource('lvm://vg0/plain', sim.opts);
  try {
    await t.throwsAsync(async () => {
      sim.read(src.devicePath);
      throw new Error('boom');
    });
  } finally {
    await src.finish(false);
  }
  await src.finish(false);
  t.is(sim.calls().filter((c) => c.startsWith('lvremove')).length, 2);
  t.deepEqual(sim.lvs(), ['data', PREV, 'plain', 'pool']);
});

test("lvcreate failure: one-line error with lvcreate's reason, nothing to remove", async (t) => {
  const sim = await makeSim({ withMeta: false }); // no thin volume involved
  sim.fail('lvcreate', '  Volume group "vg0" has insufficient free space (10 extents): 256 required.\n  Run `lvcreate --help\' for more information.\n');
  const err = await t.throwsAsync(openLvmSource('lvm://vg0/plain', sim.opts), { instanceOf: BlocksafeError });
  t.regex(err!.message, /^lvcreate failed: Volume group "vg0" has insufficient free space \(10 extents\): 256 required \(snapshot of vg0\/plain not created; /);
  t.notRegex(err!.message, /\n/);
  t.false(sim.calls().some((c) => c.startsWith('lvremove')));
});

test('a missing volume group or volume is a NotFoundError naming it; nothing is created', async (t) => {
  const sim = await makeSim({ withMeta: false }); // no thin volume involved
  const vgErr = await t.throwsAsync(openLvmSource('lvm://nosuch/data', sim.opts), { instanceOf: NotFoundError });
  t.regex(vgErr!.message, /Volume group "nosuch" was not found/);
  const lvErr = await t.throwsAsync(openLvmSource('lvm://vg0/nosuch', sim.opts), { instanceOf: NotFoundError });
  t.regex(lvErr!.message, /Logical volume "vg0\/nosuch" was not found/);
  t.false(sim.calls().some((c) => c.startsWith('lvcreate')));
  await t.throwsAsync(openLvmSource('lvm://vg0/pool', sim.opts), { instanceOf: RefusedError, message: /is a pool/ });
  writeFileSync(join(sim.dir, 'vg', 'vg0', 'plainsnap'), 'swi-a-s---|1073741824||plain||4096\n');
  await t.throwsAsync(openLvmSource('lvm://vg0/plainsnap', sim.opts), {
    instanceOf: RefusedError,
    message: 'vg0/plainsnap is itself a snapshot; back up its origin volume vg0/plain instead.',
  });
});

test('a missing lvs binary tells the user to install lvm2', async (t) => {
  const empty = scratch('blocksafe-nopath-');
  const run = createCommandRunner({ env: { PATH: empty } });
  const err = await t.throwsAsync(openLvmSource('lvm://vg0/data', { run }), { instanceOf: BlocksafeError });
  t.is(err!.message, 'lvs was not found on PATH; install lvm2 (e.g. apt-get install lvm2) to back up LVM volumes.');
});

test('thin volume: hints from thin_delta between the kept and the new snapshot; the previous one is rotated', async (t) => {
  const sim = await makeSim();
  await withLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV }, async (src) => {
    t.is(src.kind, 'thin');
    t.is(src.snapshotName, NEW);
    t.is(src.baseSnapshot, PREV);
    t.deepEqual(src.hints, NIGHT1_TO_NIGHT2);
    t.is(src.hintsUnavailable, null);
    t.is(sim.read(src.devicePath), 'contents of data\n');
  });
  t.deepEqual(sim.calls(), [
    `lvs ${LVS_ARGS} vg0`,
    `lvcreate --snapshot --permission r --setactivationskip y --name ${NEW} vg0/data`,
    `lvchange --activate y --ignoreactivationskip vg0/${NEW}`,
    `lvs ${LVS_ARGS} vg0/${NEW}`,
    'dmsetup message vg0-pool-tpool 0 reserve_metadata_snap',
    'thin_delta -m --snap1 2 --snap2 3 /dev/mapper/vg0-pool_tmeta',
    'dmsetup message vg0-pool-tpool 0 release_metadata_snap',
    `READ ${NEW}`,
    `lvchange --activate n vg0/${NEW}`,
    `lvremove -f vg0/${PREV}`,
  ]);
  t.deepEqual(sim.lvs(), ['data', NEW, 'plain', 'pool']); // the new snapshot is kept, the previous one gone
  t.deepEqual(sim.warnings, []);

  // The next night the kept snapshot is the base.
  const next = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: NEW, now: () => new Date(2024, 0, 3, 3, 0, 0) });
  // The kept snapshot (thin_id 3) against the new one (thin_id 4). The simulated pool metadata has no
  // device 4, so the real thin_delta fails there and this run falls back to a full read.
  t.is(
    sim
      .calls()
      .filter((c) => c.startsWith('thin_delta'))
      .pop(),
    'thin_delta -m --snap1 3 --snap2 4 /dev/mapper/vg0-pool_tmeta',
  );
  t.is(next.hints, null);
  t.is(next.hintsUnavailable, 'thin_delta failed: Unable to find mapping tree for snap2 (4)');
  await next.finish(true);
  t.deepEqual(sim.lvs(), ['data', 'data-blocksafe-20240103030000', 'plain', 'pool']);
});

test('thin volume: when the backup throws, the new snapshot is removed and the previous one kept', async (t) => {
  const sim = await makeSim();
  await t.throwsAsync(
    withLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV }, async (src) => {
      sim.read(src.devicePath);
      throw new Error('repository unreachable');
    }),
    { message: 'repository unreachable' },
  );
  const calls = sim.calls();
  t.deepEqual(calls.slice(-2), [`READ ${NEW}`, `lvremove -f vg0/${NEW}`]);
  t.false(calls.includes(`lvremove -f vg0/${PREV}`));
  t.deepEqual(sim.lvs(), ['data', PREV, 'plain', 'pool']);
});

test('thin volume, first backup: no previous snapshot, no hints, the new one is kept', async (t) => {
  const sim = await makeSim({ prev: null });
  const src = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: null });
  t.is(src.hints, null);
  t.is(src.baseSnapshot, null);
  t.is(src.hintsUnavailable, null);
  await src.finish(true);
  t.false(sim.calls().some((c) => c.startsWith('dmsetup') || c.startsWith('thin_delta') || c.startsWith('lvremove')));
  t.deepEqual(sim.lvs(), ['data', NEW, 'plain', 'pool']);
});

test('thin volume: a missing, writable or foreign previous snapshot gives a full read, never a removal', async (t) => {
  const sim = await makeSim({ prev: 'manual-snap' });
  // gone
  let src = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV });
  t.is(src.hints, null);
  t.regex(src.hintsUnavailable!, /no longer exists/);
  t.regex(sim.warnings.pop()!, /reads the whole volume/);
  await src.finish(false);

  // writable: it may have changed since it was backed up
  writeFileSync(join(sim.dir, 'vg', 'vg0', 'manual-snap'), 'Vwi---tz-k|134217728|pool|data|2|0\n');
  src = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: 'manual-snap' });
  t.is(src.hints, null);
  t.regex(src.hintsUnavailable!, /writable/);
  await src.finish(false);

  // read-only but not made by blocksafe: its delta is used, but blocksafe does not remove it
  writeFileSync(join(sim.dir, 'vg', 'vg0', 'manual-snap'), 'Vri---tz-k|134217728|pool|data|2|0\n');
  src = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: 'manual-snap' });
  t.deepEqual(src.hints, NIGHT1_TO_NIGHT2);
  await src.finish(true);
  t.false(sim.calls().some((c) => c.includes('lvremove -f vg0/manual-snap')));
  t.true(sim.lvs().includes('manual-snap'));

  // a classic volume never gets hints
  const classic = await openLvmSource('lvm://vg0/plain', { ...sim.opts, previousSnapshot: 'manual-snap' });
  t.is(classic.hints, null);
  await classic.finish(true);
  t.true(sim.lvs().includes('manual-snap'));
});

test('thin volume: thin_delta failing still releases the metadata snapshot and falls back to a full read', async (t) => {
  const sim = await makeSim();
  sim.fail('thin_delta', 'bad checksum in superblock\n');
  const src = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV });
  t.is(src.hints, null);
  t.regex(src.hintsUnavailable!, /thin_delta failed: bad checksum in superblock/);
  const calls = sim.calls();
  t.is(calls[calls.length - 1], 'dmsetup message vg0-pool-tpool 0 release_metadata_snap');
  t.false(existsSync(join(sim.dir, 'reserved', 'vg0-pool-tpool')));
  await src.finish(true);
  t.deepEqual(sim.lvs(), ['data', NEW, 'plain', 'pool']); // the backup (a full read) still rotates
});

test('thin volume: a metadata snapshot held by someone else is not released by blocksafe', async (t) => {
  const sim = await makeSim();
  mkdirSync(join(sim.dir, 'reserved'));
  writeFileSync(join(sim.dir, 'reserved', 'vg0-pool-tpool'), '');
  const src = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV });
  t.is(src.hints, null);
  t.regex(src.hintsUnavailable!, /could not reserve a metadata snapshot of thin pool vg0\/pool .*Device or resource busy/);
  t.false(sim.calls().some((c) => c.includes('release_metadata_snap') || c.startsWith('thin_delta')));
  await src.finish(false);
});

test('thin volume: hyphens in VG and pool names are doubled in device-mapper names', async (t) => {
  const sim = await makeSim({ vg: 'my-vg', pool: 'thin-pool' });
  const src = await openLvmSource('lvm://my-vg/data', { ...sim.opts, previousSnapshot: PREV });
  t.deepEqual(src.hints, NIGHT1_TO_NIGHT2);
  await src.finish(true);
  const calls = sim.calls();
  t.true(calls.includes('dmsetup message my--vg-thin--pool-tpool 0 reserve_metadata_snap'));
  t.true(calls.includes('thin_delta -m --snap1 2 --snap2 3 /dev/mapper/my--vg-thin--pool_tmeta'));
});

test('a failure after lvcreate removes the new snapshot and reports the failure', async (t) => {
  const sim = await makeSim();
  sim.fail('lvchange', '  Failed to activate new LV vg0/x.\n');
  const err = await t.throwsAsync(openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV }), { instanceOf: BlocksafeError });
  t.is(err!.message, 'lvchange failed: Failed to activate new LV vg0/x.');
  t.is(sim.calls().pop(), `lvremove -f vg0/${NEW}`);
  t.deepEqual(sim.lvs(), ['data', PREV, 'plain', 'pool']);
});

test('lvremove is retried while the device is busy; a lasting failure names the command to run by hand', async (t) => {
  const sim = await makeSim({ withMeta: false }); // no thin volume involved
  sim.fail('lvremove', '  Logical volume vg0/x in use.\n', 2);
  const src = await openLvmSource('lvm://vg0/plain', sim.opts);
  await src.finish(true);
  t.is(sim.calls().filter((c) => c.startsWith('lvremove')).length, 3);
  t.false(sim.lvs().includes(src.snapshotName));

  sim.fail('lvremove', '  Internal error: something broke.\n');
  const src2 = await openLvmSource('lvm://vg0/plain', sim.opts);
  const err = await t.throwsAsync(src2.finish(true), { instanceOf: BlocksafeError });
  t.is(err!.message, `could not remove the LVM snapshot vg0/${src2.snapshotName} (lvremove failed: Internal error: something broke); remove it with \`lvremove vg0/${src2.snapshotName}\`.`);

  // When the backup failed too, its error wins and the cleanup problem becomes a warning.
  sim.warnings.length = 0;
  await t.throwsAsync(
    withLvmSource('lvm://vg0/plain', { ...sim.opts, now: () => new Date(2024, 5, 1) }, async () => {
      throw new Error('backup failed');
    }),
    { message: 'backup failed' },
  );
  t.regex(sim.warnings.join('\n'), /remove it with `lvremove vg0\/plain-blocksafe-20240601000000`/);
});

test("resuming reuses the interrupted run's snapshot; a vanished one is a NotFoundError; leftovers are reported", async (t) => {
  const sim = await makeSim();
  const first = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV });
  // … the process is killed here: finish() never runs, the snapshot stays.
  const resumed = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: PREV, resumeSnapshot: first.snapshotName });
  t.is(resumed.snapshotName, first.snapshotName);
  t.deepEqual(resumed.hints, NIGHT1_TO_NIGHT2);
  t.is(sim.calls().filter((c) => c.startsWith('lvcreate')).length, 1);
  await resumed.finish(true);
  t.deepEqual(sim.lvs(), ['data', NEW, 'plain', 'pool']);

  await t.throwsAsync(openLvmSource('lvm://vg0/data', { ...sim.opts, resumeSnapshot: 'data-blocksafe-20990101000000' }), {
    instanceOf: NotFoundError,
    message: /no longer exists; start a new backup/,
  });

  // A snapshot of an interrupted run that nobody resumes is reported, not silently removed.
  sim.warnings.length = 0;
  const later = await openLvmSource('lvm://vg0/data', { ...sim.opts, previousSnapshot: null, now: () => new Date(2024, 0, 4) });
  t.regex(sim.warnings.join('\n'), new RegExp(`snapshot vg0/${NEW} is left over`));
  await later.finish(false);
});

test('the CLI backs up lvm://VG/LV from a snapshot it removes afterwards (engine/backupSource.ts); --snapshot-name and --hints are refused with lvm://', async (t) => {
  const sim = await makeSim({ withMeta: false });
  const dir = await tempDir(t);
  const repo = await initRepo(join(dir, 'repo'), { encryption: 'none' });
  const env = { ...repo.env, PATH: `${BIN}:${process.env.PATH ?? SYSTEM_PATH}`, LVM_SIM_DIR: sim.dir };
  const v = await runJson<VersionJson>(['backup', ...repo.args, 'lvm://vg0/plain', 'plain'], { env });
  t.is(v.source, 'lvm://vg0/plain');
  t.regex(v.snapshot_name, /^plain-blocksafe-\d{14}$/);
  t.true(sim.calls().includes(`lvremove -f vg0/${v.snapshot_name}`), 'the snapshot was removed');
  t.deepEqual(sim.lvs(), ['data', PREV, 'plain', 'pool']);
  const out = join(dir, 'restored');
  await runJson(['restore', ...repo.args, v.id, out], { env: repo.env });
  t.is(readFileSync(out, 'utf8'), 'contents of plain\n', 'the snapshot (a copy of the origin) restores byte-identical');

  const hints = join(dir, 'hints.json');
  writeFileSync(hints, '[]');
  for (const [extra, message] of [
    [['--hints', hints], /--hints cannot be used with lvm:\/\/ sources/],
    [['--snapshot-name', 'mine'], /--snapshot-name cannot be used with lvm:\/\/ sources/],
  ] as const) {
    const r = await runCli(['backup', ...repo.args, 'lvm://vg0/plain', 'plain', ...extra], { env });
    assertCliError(t, r, 2, message);
  }
  t.deepEqual(
    (await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env })).map((x) => x.id),
    [v.id],
    'the refused backups created nothing',
  );
  t.deepEqual(sim.lvs(), ['data', PREV, 'plain', 'pool'], 'and no snapshot');
});
