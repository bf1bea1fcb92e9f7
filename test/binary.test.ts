/**
 * The single executable (issue 10, docs/BINARY.md): build/out/blocksafe, copied alone into an empty
 * directory and run in an empty environment (`env -i`: no node on PATH, a fresh HOME, no node_modules
 * anywhere near), does the whole rescue-system round trip: --version, init, backup, ls, restore (sha256
 * compared), scrub, the Ink UI in a real terminal (tmux); and its native-addon cache behaves: content-
 * hashed files in ~/.cache/blocksafe, a damaged cached file is replaced, a noexec cache directory is
 * skipped (automatic fallback), an explicit noexec BLOCKSAFE_CACHE_DIR gives a one-line error.
 *
 * The binary is (re)built by `node build/build-binary.mjs` when it is missing or older than any source
 * (src/, ui/, build/, package.json, package-lock.json); `.ci/run` builds it first with
 * `npm run build:binary`, so here it is normally only checked, and the file takes a few seconds.
 *
 * The noexec cases mount a tmpfs inside a private mount namespace (`unshare -m`, or `unshare -rm` when not
 * root), so nothing is mounted in the machine's namespace.
 */
import { spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BUILT = path.join(ROOT, 'build', 'out', 'blocksafe');
const MANIFEST = path.join(ROOT, 'build', 'out', 'native-manifest.json');
const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const MiB = 2 ** 20;

interface Ctx {
  dir: string; // the empty directory holding only the copied binary (and what the tests create)
  bin: string;
  home: string;
  path: string; // PATH without node
}
let ctx: Ctx;

function newestMtime(entry: string): number {
  let st: fs.Stats;
  try {
    st = fs.statSync(entry);
  } catch {
    return 0;
  }
  if (!st.isDirectory()) return st.mtimeMs;
  let newest = st.mtimeMs;
  for (const name of fs.readdirSync(entry)) {
    if (name === 'out' && entry === path.join(ROOT, 'build')) continue;
    if (name === 'node_modules') continue;
    newest = Math.max(newest, newestMtime(path.join(entry, name)));
  }
  return newest;
}

function binaryIsStale(): boolean {
  if (!fs.existsSync(BUILT) || !fs.existsSync(MANIFEST)) return true;
  const sources = ['src', 'ui', 'build', 'package.json', 'package-lock.json'].map((p) => newestMtime(path.join(ROOT, p)));
  return Math.max(...sources) > fs.statSync(BUILT).mtimeMs;
}

function runAsync(cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr.on('data', (b: Buffer) => (out += b.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, out }));
  });
}

/**
 * A PATH without node. The rescue-system PATH is /usr/bin:/bin; on machines where node itself lives in
 * /usr/bin (Debian's nodejs, or this one), a private directory with links to the few tools a shell user
 * would have stands in for it, so the check that node cannot be found still holds.
 */
function pathWithoutNode(dir: string): string {
  const plain = '/usr/bin:/bin';
  if (spawnSync('/bin/sh', ['-c', 'command -v node'], { env: { PATH: plain } }).status !== 0) return plain;
  const bin = path.join(dir, '.path');
  fs.mkdirSync(bin);
  for (const tool of ['sh', 'env', 'ls', 'cat', 'stty', 'sha256sum', 'mount', 'findmnt']) {
    for (const d of ['/usr/bin', '/bin', '/usr/sbin', '/sbin']) {
      if (fs.existsSync(path.join(d, tool))) {
        fs.symlinkSync(path.join(d, tool), path.join(bin, tool));
        break;
      }
    }
  }
  return bin;
}

/** Runs the copied binary in an empty environment (what `env -i PATH=… HOME=…` gives). */
function blocksafe(args: string[], extraEnv: Record<string, string> = {}, opts: { cwd?: string; bin?: string } = {}): SpawnSyncReturns<string> {
  return spawnSync(opts.bin ?? ctx.bin, args, {
    cwd: opts.cwd ?? ctx.dir,
    env: { PATH: ctx.path, HOME: ctx.home, ...extraEnv },
    encoding: 'utf8',
    timeout: 60_000,
  });
}

function ok(r: SpawnSyncReturns<string>, what: string): string {
  if (r.status !== 0) throw new Error(`${what} exited ${r.status ?? r.signal}:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

function sha256File(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

test.before(async (t) => {
  t.timeout(5 * 60_000, 'building the single executable');
  if (binaryIsStale()) {
    t.log('build/out/blocksafe is missing or older than the sources: building it (npm run build:binary does the same)');
    const r = await runAsync(process.execPath, [path.join(ROOT, 'build', 'build-binary.mjs'), '--quiet']);
    if (r.code !== 0) throw new Error(`node build/build-binary.mjs failed:\n${r.out}`);
  }
  const dir = fs.mkdtempSync(path.join(tmpdir(), 'blocksafe-binary-'));
  const bin = path.join(dir, 'blocksafe');
  fs.copyFileSync(BUILT, bin);
  fs.chmodSync(bin, 0o755);
  const home = fs.mkdtempSync(path.join(tmpdir(), 'blocksafe-binary-home-'));
  ctx = { dir, bin, home, path: pathWithoutNode(home) };
});

test.after.always(() => {
  if (!ctx) return;
  fs.rmSync(ctx.dir, { recursive: true, force: true });
  fs.rmSync(ctx.home, { recursive: true, force: true });
});

test.serial('the executable runs alone: no node on PATH, nothing but itself in its directory', (t) => {
  const which = spawnSync('/bin/sh', ['-c', 'command -v node'], { env: { PATH: ctx.path, HOME: ctx.home }, encoding: 'utf8' });
  t.not(which.status, 0, `node must not be reachable in the test environment, found ${which.stdout}`);
  t.deepEqual(fs.readdirSync(ctx.dir), ['blocksafe']);

  const size = fs.statSync(ctx.bin).size;
  const times: number[] = [];
  for (let i = 0; i < 8; i++) {
    const start = process.hrtime.bigint();
    const r = blocksafe(['--version']);
    times.push(Number(process.hrtime.bigint() - start) / 1e6);
    t.is(ok(r, '--version').trim(), VERSION);
    t.is(r.stderr, '', 'no warning (e.g. the experimental-SEA one) on stderr');
  }
  const first = times.shift()!; // the first start also extracts the addons into the fresh HOME
  times.sort((a, b) => a - b);
  const median = times[3]!;
  t.log(`size ${(size / 1e6).toFixed(1)} MB; --version: first start (extracting the addons) ${first.toFixed(0)} ms, then median ${median.toFixed(0)} ms (min ${times[0]!.toFixed(0)})`);
  t.true(size < 150e6, `the executable is ${size} bytes`);
  t.true(median < 3000, `--version takes ${median} ms`);

  // The addons were extracted once, content-hashed, to the first-choice cache directory.
  const manifest = JSON.parse(fs.readFileSync(MANIFEST, 'utf8')) as { addons: Record<string, { file: string; sha256: string }> };
  t.true(Object.keys(manifest.addons).includes('lmdb') && Object.keys(manifest.addons).includes('zstd-napi'));
  for (const a of Object.values(manifest.addons)) {
    const file = path.join(ctx.home, '.cache', 'blocksafe', 'native', a.sha256.slice(0, 16), a.file);
    t.is(sha256File(file), a.sha256, file);
  }
});

test.serial('init, backup, ls, restore (sha256 equal), scrub and the UI, all from the binary', async (t) => {
  const work = fs.mkdtempSync(path.join(ctx.dir, 'work-'));
  t.teardown(() => fs.rmSync(work, { recursive: true, force: true }));
  // 20 MiB: 4 MiB random, 4 MiB zeros, 6 MiB text, 4 MiB random again (a duplicate block), 2 MiB text tail.
  const random = randomBytes(4 * MiB);
  const text = Buffer.from('The quick brown fox jumps over the lazy dog. 0123456789\n'.repeat(Math.ceil((8 * MiB) / 56)));
  const image = Buffer.concat([random, Buffer.alloc(4 * MiB), text.subarray(0, 6 * MiB), random, text.subarray(0, 2 * MiB)]);
  t.is(image.length, 20 * MiB);
  const source = path.join(work, 'source.img');
  fs.writeFileSync(source, image);
  const repo = path.join(work, 'R');

  ok(blocksafe(['init', '--repo', repo, '--encryption', 'none'], {}, { cwd: work }), 'init');
  ok(blocksafe(['backup', '--repo', repo, source, 'vol'], {}, { cwd: work }), 'backup');
  const versions = JSON.parse(ok(blocksafe(['ls', '--repo', repo, '--json'], {}, { cwd: work }), 'ls')) as Array<{ id: string; name: string; valid: boolean; complete: boolean; size: number }>;
  t.is(versions.length, 1);
  const v = versions[0]!;
  t.like(v, { name: 'vol', valid: true, complete: true, size: 20 * MiB });

  const out = path.join(work, 'out.img');
  ok(blocksafe(['restore', '--repo', repo, v.id, out], {}, { cwd: work }), 'restore');
  t.is(sha256File(out), createHash('sha256').update(image).digest('hex'));

  const scrub = JSON.parse(ok(blocksafe(['scrub', '--repo', repo, '--all', '--json'], {}, { cwd: work }), 'scrub')) as { blocks_checked: number; damaged: unknown[] };
  t.true(scrub.blocks_checked >= 3, `scrub checked ${scrub.blocks_checked} blocks`);
  t.deepEqual(scrub.damaged, []);

  // The Ink UI (ink + yoga, patched for CommonJS at build time) in a real terminal.
  const sock = `blocksafe-binary-${process.pid}`;
  const tmux = (...args: string[]) => spawnSync('tmux', ['-L', sock, ...args], { encoding: 'utf8' });
  t.teardown(() => void tmux('kill-server'));
  const envArgs = `PATH=${ctx.path} HOME=${ctx.home} TERM=xterm-256color LANG=C.UTF-8`;
  const started = tmux('new-session', '-d', '-x', '120', '-y', '30', `cd ${work} && env -i ${envArgs} ${ctx.bin} ui --repo ${repo}; echo UI-EXIT=$?; sleep 60`);
  t.is(started.status, 0, `tmux (needed for this test; .ci/run installs it): ${started.stderr}${started.error?.message ?? ''}`);
  const screen = async (want: RegExp): Promise<string> => {
    let last = '';
    for (let i = 0; i < 100; i++) {
      last = tmux('capture-pane', '-p').stdout;
      if (want.test(last)) return last;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`the terminal never showed ${want}:\n${last}`);
  };
  const shown = await screen(new RegExp(v.id));
  t.regex(shown, /blocksafe ·/);
  t.regex(shown, /vol/);
  tmux('send-keys', 'q');
  t.regex(await screen(/UI-EXIT=\d+/), /UI-EXIT=0/);
});

test.serial('a damaged cached addon is replaced', (t) => {
  const manifest = JSON.parse(fs.readFileSync(MANIFEST, 'utf8')) as { addons: Record<string, { file: string; sha256: string }> };
  const lmdb = manifest.addons.lmdb!;
  const file = path.join(ctx.home, '.cache', 'blocksafe', 'native', lmdb.sha256.slice(0, 16), lmdb.file);
  fs.writeFileSync(file, 'not an ELF file');
  t.is(ok(blocksafe(['--version']), '--version').trim(), VERSION);
  t.is(sha256File(file), lmdb.sha256);
});

/** Runs `script` as root of a private mount namespace (so its mounts vanish with it). */
function inMountNamespace(script: string, args: string[]): SpawnSyncReturns<string> {
  const flags = process.getuid?.() === 0 ? ['-m'] : ['-r', '-m'];
  return spawnSync('unshare', [...flags, '/bin/sh', '-ec', script, 'sh', ...args], { encoding: 'utf8', timeout: 60_000 });
}

test.serial('a cache directory on a noexec filesystem is skipped; an explicit noexec BLOCKSAFE_CACHE_DIR is a one-line error', (t) => {
  const base = fs.mkdtempSync(path.join(ctx.dir, 'noexec-'));
  t.teardown(() => fs.rmSync(base, { recursive: true, force: true }));
  const noexec = path.join(base, 'noexec');
  const execTmp = path.join(base, 'tmp');
  fs.mkdirSync(noexec);
  fs.mkdirSync(execTmp);
  const mount = 'mount -t tmpfs -o noexec,nosuid,size=64m blocksafe-noexec "$1"; mkdir -p "$1/home"';
  const probe = inMountNamespace(`${mount}; findmnt -no OPTIONS -T "$1"`, [noexec]);
  t.is(probe.status, 0, `a private mount namespace with a tmpfs is needed for this test (unshare -m; root or user namespaces): ${probe.stderr}`);
  t.regex(probe.stdout, /noexec/);

  // HOME (the first choice) is noexec: the addons go to $TMPDIR/blocksafe-<uid> and the command works.
  const fallback = inMountNamespace(`${mount}; exec env -i PATH="$2" HOME="$1/home" TMPDIR="$3" "$4" --version`, [noexec, ctx.path, execTmp, ctx.bin]);
  t.is(fallback.status, 0, fallback.stderr);
  t.is(fallback.stdout.trim(), VERSION);
  t.is(fallback.stderr, '');
  const extracted = fs.readdirSync(execTmp).filter((n) => n.startsWith('blocksafe-'));
  t.is(extracted.length, 1);
  t.true(fs.readdirSync(path.join(execTmp, extracted[0]!, 'native')).length >= 2);

  // An explicit BLOCKSAFE_CACHE_DIR is never second-guessed: one line naming it and what to do.
  const explicit = inMountNamespace(`${mount}; exec env -i PATH="$2" HOME="$1/home" BLOCKSAFE_CACHE_DIR="$1/cache" "$3" --version`, [noexec, ctx.path, ctx.bin]);
  t.is(explicit.status, 1);
  t.is(explicit.stdout, '');
  t.is(explicit.stderr.trimEnd().split('\n').length, 1, explicit.stderr);
  t.regex(explicit.stderr, /^blocksafe: .*BLOCKSAFE_CACHE_DIR.*noexec/);

  // Every candidate noexec (HOME, TMPDIR, /tmp, /var/tmp, /dev/shm): the same one-line advice.
  const none = inMountNamespace(
    // /tmp is covered too, which may hide the binary (the checkout itself can live under /tmp): run a copy
    // from an exec-able tmpfs of this namespace.
    'mkdir -p /run/blocksafe-x; mount -t tmpfs -o size=256m blocksafe-x /run/blocksafe-x; cp "$1" /run/blocksafe-x/blocksafe; ' +
      'for d in /tmp /var/tmp /dev/shm; do mount -t tmpfs -o noexec,size=16m blocksafe-noexec "$d"; done; exec env -i PATH=/usr/bin:/bin HOME=/tmp/home TMPDIR=/var/tmp /run/blocksafe-x/blocksafe --version',
    [BUILT],
  );
  t.is(none.status, 1);
  t.is(none.stderr.trimEnd().split('\n').length, 1, none.stderr);
  t.regex(none.stderr, /^blocksafe: no usable cache directory .*BLOCKSAFE_CACHE_DIR/);
});
