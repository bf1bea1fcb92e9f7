/**
 * The single executable on an old rescue system (issue 19): build/out/blocksafe copied into a Debian 11
 * (bullseye, glibc 2.31) root made by `debootstrap --variant=minbase`, run there with chroot in an empty
 * environment: --version, init (encrypted), backup, ls, restore (sha256 equal), scrub, and the Ink UI in a
 * real terminal (tmux). Also once without /proc mounted (a bare chroot), where the addon loader falls back
 * to loading by path.
 *
 * The root comes from build/compat/debian-root.sh (cached under /var/cache/blocksafe/roots; built when
 * missing, about 35-90 s). Each run bind-mounts a fresh scratch directory at /mnt inside a private mount
 * namespace, so the cached root is never written to. More suites: BLOCKSAFE_OLDGLIBC_SUITES="bullseye
 * buster" (buster needs a mirror that still has it: BLOCKSAFE_DEBIAN_MIRROR, e.g. archive.debian.org).
 *
 * Needs root, debootstrap, unshare and tmux. Skipped without them, except under CI=true, where it fails.
 */
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';
import { compareVersions } from '../build/lib/elf.mjs';
import { BUILT, ensureBinary } from './binaryBuild.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const SUITES = (process.env.BLOCKSAFE_OLDGLIBC_SUITES ?? 'bullseye').split(/\s+/).filter(Boolean);
const MiB = 2 ** 20;
const PASSPHRASE = 'rescue day passphrase';

function unavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root (debootstrap and chroot need it)';
  for (const tool of ['debootstrap', 'unshare', 'chroot', 'tmux']) {
    if (spawnSync('/bin/sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed`;
  }
  return undefined;
}
const why = unavailable();
const maybe = why && process.env.CI !== 'true' ? test.serial.skip : test.serial;
if (why)
  test.serial(`old-glibc check ${process.env.CI === 'true' ? 'cannot run under CI' : 'skipped'}: ${why}`, (t) => {
    if (process.env.CI === 'true') t.fail(`the Debian 11 check must run in CI: ${why}`);
    else t.log(`skipped: ${why}`);
    t.is(typeof why, 'string');
  });

/** The cached root of `suite`, built when missing. */
function debianRoot(suite: string): { dir: string; seconds: number; cached: boolean } {
  const started = Date.now();
  const r = spawnSync(path.join(ROOT, 'build', 'compat', 'debian-root.sh'), [suite], { encoding: 'utf8', timeout: 15 * 60_000 });
  if (r.status !== 0) throw new Error(`build/compat/debian-root.sh ${suite} failed:\n${r.stderr}`);
  return { dir: r.stdout.trim(), seconds: (Date.now() - started) / 1000, cached: !/debootstrap/.test(r.stderr) };
}

/**
 * A shell command line that runs `blocksafe ARGS` inside `root` with `work` at /mnt: private mount
 * namespace, /proc (unless noProc), /dev/pts for terminals, chroot, empty environment.
 */
function chrootCommand(root: string, work: string, opts: { noProc?: boolean; env?: Record<string, string> } = {}): string[] {
  const env = Object.entries({ PATH: '/usr/bin:/bin', HOME: '/mnt/home', LANG: 'C.UTF-8', ...opts.env }).map(([k, v]) => `${k}=${v}`);
  const script = [
    'root=$1; work=$2; shift 2',
    opts.noProc ? '' : 'mount -t proc proc "$root/proc"',
    'mount --bind /dev/pts "$root/dev/pts"',
    'mount --bind "$work" "$root/mnt"',
    `exec chroot "$root" env -i ${env.map((e) => `'${e}'`).join(' ')} /mnt/blocksafe "$@"`,
  ]
    .filter(Boolean)
    .join('\n');
  return ['unshare', '-m', '--propagation', 'private', 'sh', '-ec', script, 'sh', root, work];
}

for (const suite of SUITES) {
  maybe(`the single executable in a Debian ${suite} root (debootstrap --variant=minbase): init, backup, ls, restore, scrub, ui`, async (t) => {
    t.timeout(20 * 60_000, `building the ${suite} root (debootstrap) and the executable`);
    await ensureBinary(t);
    const root = debianRoot(suite);
    const glibc = /^glibc=(.+)$/m.exec(fs.readFileSync(path.join(root.dir, '.blocksafe-root-ok'), 'utf8'))?.[1] ?? '?';
    t.log(`${suite} root ${root.dir}: glibc ${glibc}, ${root.cached ? 'cached' : 'built'} (${root.seconds.toFixed(1)} s)`);
    const ldd = spawnSync('chroot', [root.dir, 'ldd', '--version'], { encoding: 'utf8' });
    t.regex(ldd.stdout.split('\n')[0]!, new RegExp(`${glibc.replace(/\./g, '\\.')}$`));
    t.true(compareVersions(glibc, '2.34') < 0, `the ${suite} root has glibc ${glibc}, which lmdb's prebuilt addon would refuse`);

    const started = Date.now();
    const work = fs.mkdtempSync(path.join(tmpdir(), `blocksafe-${suite}-`));
    t.teardown(() => fs.rmSync(work, { recursive: true, force: true }));
    fs.mkdirSync(path.join(work, 'home'));
    fs.copyFileSync(BUILT, path.join(work, 'blocksafe'));
    fs.chmodSync(path.join(work, 'blocksafe'), 0o755);
    const run = (args: string[], opts: { noProc?: boolean; env?: Record<string, string> } = {}): SpawnSyncReturns<string> => {
      const [cmd, ...rest] = chrootCommand(root.dir, work, opts);
      return spawnSync(cmd!, [...rest, ...args], { encoding: 'utf8', timeout: 120_000 });
    };
    const ok = (args: string[], opts: { noProc?: boolean; env?: Record<string, string> } = {}): string => {
      const r = run(args, opts);
      if (r.status !== 0) throw new Error(`blocksafe ${args.join(' ')} in ${suite} exited ${r.status ?? r.signal}:\n${r.stderr}${r.stdout}`);
      return r.stdout;
    };
    const secret = { BLOCKSAFE_PASSPHRASE: PASSPHRASE };

    t.is(ok(['--version']).trim(), VERSION);
    // 16 MiB: random, zeros, text, the random block again (deduplicated).
    const random = randomBytes(4 * MiB);
    const text = Buffer.from('Debian 11 rescue system, restore day. 0123456789\n'.repeat(Math.ceil((4 * MiB) / 49))).subarray(0, 4 * MiB);
    const image = Buffer.concat([random, Buffer.alloc(4 * MiB), text, random]);
    fs.writeFileSync(path.join(work, 'source.img'), image);
    ok(['init', '--repo', '/mnt/R'], { env: secret });
    ok(['backup', '--repo', '/mnt/R', '/mnt/source.img', 'root-lv'], { env: secret });
    const versions = JSON.parse(ok(['ls', '--repo', '/mnt/R', '--json'], { env: secret })) as Array<{ id: string; name: string; valid: boolean; size: number }>;
    t.is(versions.length, 1);
    t.like(versions[0], { name: 'root-lv', valid: true, size: 16 * MiB });
    const id = versions[0]!.id;
    ok(['restore', '--repo', '/mnt/R', id, '/mnt/restored.img'], { env: secret });
    t.is(
      createHash('sha256')
        .update(fs.readFileSync(path.join(work, 'restored.img')))
        .digest('hex'),
      createHash('sha256').update(image).digest('hex'),
    );
    const scrub = JSON.parse(ok(['scrub', '--repo', '/mnt/R', '--all', '--json'], { env: secret })) as { blocks_checked: number; damaged: unknown[] };
    t.true(scrub.blocks_checked >= 2, `scrub checked ${scrub.blocks_checked} blocks`);
    t.deepEqual(scrub.damaged, []);
    // The addons were verified and cached where a rescue user's HOME is (here /mnt/home).
    t.true(fs.readdirSync(path.join(work, 'home', '.cache', 'blocksafe', 'native')).length >= 2);

    // A bare chroot without /proc: the loader checks the directories and loads the verified files by path.
    t.is(ok(['ls', '--repo', '/mnt/R', '--json'], { noProc: true, env: secret }).includes(id), true);

    // The Ink UI in a real terminal: tmux on this machine runs the chroot command.
    const sock = `blocksafe-${suite}-${process.pid}`;
    const tmux = (...args: string[]) => spawnSync('tmux', ['-L', sock, ...args], { encoding: 'utf8' });
    t.teardown(() => void tmux('kill-server'));
    const line = [...chrootCommand(root.dir, work, { env: { ...secret, TERM: 'xterm-256color' } }), 'ui', '--repo', '/mnt/R'].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
    const startedUi = tmux('new-session', '-d', '-x', '120', '-y', '30', `${line}; echo UI-EXIT=$?; sleep 60`);
    t.is(startedUi.status, 0, startedUi.stderr);
    const screen = async (want: RegExp): Promise<string> => {
      let last = '';
      for (let i = 0; i < 150; i++) {
        last = tmux('capture-pane', '-p').stdout;
        if (want.test(last)) return last;
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error(`the terminal never showed ${want}:\n${last}`);
    };
    const shown = await screen(new RegExp(id));
    t.regex(shown, /root-lv/);
    tmux('send-keys', 'q');
    t.regex(await screen(/UI-EXIT=\d+/), /UI-EXIT=0/);
    t.log(`${suite}: the whole round trip took ${((Date.now() - started) / 1000).toFixed(1)} s`);
  });
}
