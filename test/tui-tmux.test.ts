/**
 * End to end: the real `blocksafe ui` in a real terminal (tmux), on a real repository made with the real CLI.
 * Keys go in with `tmux send-keys`; what the user would see is read with `tmux capture-pane -p` and saved as
 * text screenshots in test-artifacts/tui/. It unlocks the repository with a passphrase typed into the UI,
 * restores a version to a new file and checks its sha256, stops a restore half-way and resumes it, restores
 * over an existing file (typed confirmation) and — where loop devices work — to a block device chosen from
 * the list, then quits and checks the terminal is back to normal. As root, the Mount action mounts a version
 * (FUSE, a `blocksafe mount` child process) and unmounts it.
 *
 * The command under test is `node bin/blocksafe.js`, or $BLOCKSAFE_BIN (e.g. build/out/blocksafe) for the
 * single executable.
 */
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { promisify } from 'node:util';
import test, { type ExecutionContext } from 'ava';
import {
  attachLoop,
  backupJson,
  flipBit,
  initKeyFileRepo,
  initRepo,
  listObjects,
  loopDevicesWork,
  makeImage,
  MiB,
  PASSPHRASE,
  readRange,
  ROOT,
  run as runCmd,
  runJson,
  runStatus,
  sha256File,
  tempDir,
  type ImageLayout,
  type VersionJson,
} from './helpers.js';

const execFileP = promisify(execFile);
const ARTIFACTS = path.join(ROOT, 'test-artifacts', 'tui');
const COMMAND = process.env.BLOCKSAFE_BIN ? path.resolve(ROOT, process.env.BLOCKSAFE_BIN) : `${process.execPath} ${path.join(ROOT, 'bin', 'blocksafe.js')}`;
const haveTmux = spawnSync('sh', ['-c', 'command -v tmux'], { stdio: 'ignore' }).status === 0;

/** Poll interval of the screen (polling for a state, never a wait that decides anything). */
const poll = () => new Promise<void>((r) => setTimeout(r, 50));
/** Generous: a loaded 2-core machine must not fail a correct UI. */
const DEADLINE_MS = 60_000;

/** A tmux server of our own (its own socket), so nothing of the user's tmux is touched. */
class Tmux {
  readonly socket = `blocksafe-tui-test-${process.pid}`;
  private shots = 0;
  constructor(
    private readonly t: ExecutionContext,
    private readonly env: NodeJS.ProcessEnv,
  ) {}

  async run(...args: string[]): Promise<string> {
    const { stdout } = await execFileP('tmux', ['-L', this.socket, '-f', '/dev/null', ...args], { env: this.env });
    return stdout;
  }

  async start(command: string, width: number, height: number): Promise<void> {
    this.t.teardown(() => this.run('kill-server').catch(() => undefined));
    await this.run('new-session', '-d', '-s', 'ui', '-x', String(width), '-y', String(height), command);
    await this.run('set-option', '-t', 'ui', 'remain-on-exit', 'on');
  }

  /** The visible screen as text; `join` undoes the terminal's wrapping of long lines. */
  screen(join = false): Promise<string> {
    return this.run('capture-pane', '-p', ...(join ? ['-J'] : []), '-t', 'ui');
  }

  /**
   * Named keys (Enter, Escape, Down, Tab, C-c …), sent back to back: the UI handles keys in order, one at a
   * time, even when several arrive in one read (Esc and the next key included).
   */
  async keys(...keys: string[]): Promise<void> {
    for (const k of keys) await this.run('send-keys', '-t', 'ui', k);
  }

  /** Text typed literally. */
  async type(text: string): Promise<void> {
    await this.run('send-keys', '-t', 'ui', '-l', '--', text);
  }

  /**
   * Polls until the screen contains `what` (a string also when the UI wrapped it over lines); fails with
   * the screen after a generous deadline.
   */
  async waitFor(what: string | RegExp, timeoutMs = DEADLINE_MS): Promise<string> {
    const end = Date.now() + timeoutMs;
    const flat = (x: string) => x.replace(/\s+/g, ' ');
    for (;;) {
      const s = await this.screen();
      if (typeof what === 'string' ? s.includes(what) || flat(s).includes(flat(what)) : what.test(s)) return s;
      if (Date.now() > end) throw new Error(`timed out waiting for ${String(what)} on the screen:\n${s}`);
      await poll();
    }
  }

  /** Sends `key` until the screen matches `what`, waiting for each key's effect (a changed screen). */
  async keyUntil(key: string, what: RegExp, max = 60): Promise<string> {
    let s = await this.screen();
    for (let i = 0; i < max && !what.test(s); i++) {
      const before = s;
      await this.keys(key);
      const end = Date.now() + DEADLINE_MS;
      while ((s = await this.screen()) === before && Date.now() < end) await poll();
    }
    if (!what.test(s)) throw new Error(`${key} × ${max} did not bring ${String(what)} on the screen:\n${s}`);
    return s;
  }

  /** Saves the current screen as test-artifacts/tui/NN-name.txt and returns it. */
  async shot(name: string): Promise<string> {
    const s = await this.screen();
    await fs.mkdir(ARTIFACTS, { recursive: true });
    await fs.writeFile(path.join(ARTIFACTS, `${String(++this.shots).padStart(2, '0')}-${name}.txt`), s);
    return s;
  }
}

function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('BLOCKSAFE_') || k.startsWith('NODE_OPTIONS') || k === 'CI' || k === 'CONTINUOUS_INTEGRATION' || k === 'TMUX') continue;
    env[k] = v;
  }
  env.TERM = 'xterm-256color';
  env.LANG = env.LANG ?? 'C.UTF-8';
  return env;
}

/** Makes the filter show exactly one version and opens the restore wizard for it. */
async function openRestore(tm: Tmux, id: string): Promise<void> {
  await tm.keys('/');
  await tm.type(id);
  await tm.keys('Enter');
  await tm.waitFor('1 shown');
  await tm.keys('Enter');
  await tm.waitFor('Where should it be restored to?');
}

const run = haveTmux ? test.serial : test.serial.skip;
if (!haveTmux && process.env.CI === 'true') test('tmux is needed in CI for the terminal UI tests', (t) => t.fail('tmux is not installed'));

/** Bytes a restore to a fresh file writes from block `from` on: zero blocks become holes and are not written. */
function bytesFrom(layout: ImageLayout, size: number, from: number): number {
  const bs = layout.blockSize ?? 4 * 1024 * 1024; // makeImage's default
  let n = 0;
  for (let i = from; i * bs < size; i++) {
    const kind = layout.blocks[i] ?? layout.tail?.kind;
    if (kind !== 'zero') n += Math.min(bs, size - i * bs);
  }
  return n;
}

run(
  'blocksafe ui in tmux: unlock, list, restore to a file (sha256), stop past 50 % and resume from there, in-use targets refused, overwrite with typed name, device, damage zero-filled, exit codes',
  async (t) => {
    t.timeout(300_000);
    const dir = await tempDir(t, 'blocksafe-tui-');
    // 1 MiB blocks keep the images small while a restore still has enough blocks to stop half-way.
    const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' });
    const layout = (seed: string): ImageLayout => ({
      blockSize: MiB,
      seed,
      blocks: ['random', 'zero', 'text', { dup: 0 }, 'random', 'random', 'text', 'random', 'random', 'zero', 'random', 'text'],
      tail: { bytes: 123_457, kind: 'random' },
    });
    const v1Layout = layout('night-1');
    const v1Image = await makeImage(path.join(dir, 'root-v1.img'), v1Layout);
    const v2Image = await makeImage(path.join(dir, 'root-v2.img'), layout('night-2'));
    const homeImage = await makeImage(path.join(dir, 'home.img'), { blockSize: MiB, seed: 'home', blocks: ['text', 'random', 'random'] });
    const v1 = await backupJson(repo, v1Image.path, 'root', ['--tag', 'keep']);
    const v2 = await backupJson(repo, v2Image.path, 'root');
    // The objects home adds (all its blocks are its own): one of them is damaged later.
    const before = new Set(await listObjects(repo.dir));
    const home = await backupJson(repo, homeImage.path, 'home');
    const homeObjects = (await listObjects(repo.dir)).filter((o) => !before.has(o));
    t.is(homeObjects.length, 3, 'precondition: home has three objects of its own');
    // The target is written at 1 MiB/s, so a restore of 12 MiB lasts long enough (~12 s) to be stopped past half-way.
    const config = path.join(dir, 'ui.conf');
    await fs.writeFile(config, '[pipeline]\nwrite_limit = 1M\n');

    await fs.rm(ARTIFACTS, { recursive: true, force: true });
    const tm = new Tmux(t, cleanEnv());
    const cmd = `cd ${ROOT} && ${COMMAND} ui --repo ${repo.dir} --config ${config}; echo "EXIT=$?"`;
    await tm.start(cmd, 100, 30);

    // Unlock with the passphrase typed into the UI (nothing in the environment).
    await tm.waitFor('This repository is encrypted.');
    await tm.type('wrong passphrase');
    await tm.keys('Enter');
    let s = await tm.waitFor("Error: Wrong passphrase: it opens none of the repository's key slots.");
    t.false(s.includes('wrong passphrase'), 'the passphrase is never shown');
    await tm.shot('unlock-wrong-passphrase');
    await tm.type(PASSPHRASE);
    await tm.keys('Enter');

    // The list: grouped by volume, newest first, status words, details and the key help.
    s = await tm.waitFor('3 versions of 2 volumes');
    await tm.shot('versions');
    t.regex(s, /== home \(1 version\)/);
    t.regex(s, /== root \(2 versions\)/);
    t.true(s.indexOf('== home') < s.indexOf('== root'));
    t.true(s.indexOf(v2.id) < s.indexOf(v1.id), 'newest first');
    t.regex(s, /date \(UTC[+-]\d\d:\d\d\)/);
    t.regex(s, new RegExp(`${v1.id} \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d(:\\d\\d)? .*valid\\s+keep`));
    t.regex(s, new RegExp(`${v2.id} .*valid \\(newest valid\\)`));
    t.regex(s, /q quit/);
    t.regex(s, /\? help/);
    for (const line of s.split('\n')) t.true(line.length <= 100);

    // Restore a version to a new file.
    const target1 = path.join(dir, 'restored-home.img');
    await openRestore(tm, home.id);
    await tm.shot('restore-target');
    await tm.type(target1);
    await tm.keys('Enter');
    s = await tm.waitFor('Check before restoring');
    t.regex(s, /A new file is created/);
    await tm.shot('restore-summary');
    await tm.keys('Enter');
    s = await tm.waitFor(/Restoring .*ETA/s);
    await tm.shot('restore-started');
    s = await tm.waitFor('DONE: the restore finished and every block was verified.');
    t.regex(s, /5 Result/);
    await tm.shot('restore-done');
    t.is(await sha256File(target1), homeImage.sha256, 'the restored file equals the backed-up image');

    // Stop a restore past half-way with Esc; the Check step then offers to resume at the same figure, and the
    // resumed restore writes only what was missing. The result is exact.
    await tm.keys('Enter');
    await tm.waitFor('3 versions of');
    const target2 = path.join(dir, 'restored-root.img');
    await openRestore(tm, v1.id);
    await tm.type(target2);
    await tm.keys('Enter');
    await tm.waitFor('Press Enter to start the restore');
    await tm.keys('Enter');
    await tm.waitFor(/Restoring .* (5\d|6\d|7\d|8\d)\.\d %/s);
    await tm.shot('restore-progress');
    await tm.keys('Escape');
    await tm.waitFor('Stop the restore?');
    await tm.keys('y');
    s = await tm.waitFor(/STOPPED at .*\./);
    await tm.shot('restore-stopped');
    const stopped = /STOPPED at (\d+\.\d) % \((\d+) of (\d+) blocks\)/.exec(s);
    t.truthy(stopped, s);
    t.true(Number(stopped![1]) >= 50 && Number(stopped![1]) < 100, `stopped past half-way: ${stopped![1]} %`);
    t.regex(s, /4 Restore STOPPED/);
    t.notRegex(s, /4 Restore ok/);
    await tm.keys('Enter');
    await tm.waitFor('3 versions of');
    await openRestore(tm, v1.id);
    await tm.type(target2);
    await tm.keys('Enter');
    s = await tm.waitFor('An interrupted restore of this version to this target exists', DEADLINE_MS);
    s = await tm.screen(true);
    t.regex(s, new RegExp(`it resumes at ${stopped![1]} % \\(${stopped![2]} of ${stopped![3]} blocks\\)`), 'the Check step shows the STOPPED figure');
    await tm.shot('resume-offered');
    await tm.keys('r');
    s = await tm.waitFor(/DONE: the restore finished|FINISHED WITH DAMAGE|did not finish/);
    t.regex(s, /DONE/);
    await tm.shot('restore-resumed-done');
    t.is(await sha256File(target2), v1Image.sha256, 'the stopped and resumed restore is exact');
    const resumedBytes = bytesFrom(v1Layout, v1Image.size, Number(stopped![2]));

    // Restore another version over the existing file: only after typing its name.
    await tm.keys('Enter');
    await tm.waitFor('3 versions of');
    await openRestore(tm, home.id);
    await tm.type(target2);
    await tm.keys('Enter');
    s = await tm.waitFor('type its name');
    t.regex(s, /OVERWRITTEN/);
    await tm.type('restored');
    await tm.keys('Enter');
    s = await tm.waitFor('Error: You typed "restored", not "restored-root.img": nothing was written.');
    await tm.shot('overwrite-wrong-name');
    t.is(await sha256File(target2), v1Image.sha256, 'nothing written after a wrong name');
    await tm.type('-root.img');
    await tm.keys('Enter');
    await tm.waitFor('DONE: the restore finished');
    t.is(await sha256File(target2), homeImage.sha256, 'the file is now exactly the other version');

    if (loopDevicesWork()) {
      // The backing file of a mounted loop device, and the device: refused on the Target step, untouched.
      const img = path.join(dir, 'mounted.img');
      await fs.writeFile(img, Buffer.alloc(0));
      await fs.truncate(img, 16 * MiB);
      await runCmd('mkfs.ext4', ['-q', '-F', img]);
      const mdev = await attachLoop(t, img);
      const mnt = path.join(dir, 'mnt');
      await fs.mkdir(mnt);
      await runCmd('mount', [mdev, mnt]);
      t.teardown(() => runStatus('umount', [mnt]));
      const imgHash = await sha256File(img);
      await tm.keys('Enter');
      await tm.waitFor('3 versions of');
      await openRestore(tm, home.id);
      await tm.type(img);
      await tm.keys('Enter');
      s = await tm.waitFor(`it backs loop device ${mdev} (mounted on ${mnt})`);
      await tm.shot('refused-mounted-loop-file');
      t.regex(s, /\[2 Target\]/);
      await tm.keys('C-u');
      await tm.type(mdev);
      await tm.keys('Enter');
      s = await tm.waitFor(`${mdev} cannot be used: mounted on ${mnt}`);
      t.regex(s, /\[2 Target\]/);
      await tm.keys('C-u', 'Escape');
      t.is(await sha256File(img), imgHash, 'the mounted image is untouched');

      // A block device from the list (a loop device over a file).
      const backing = path.join(dir, 'disk.img');
      await fs.writeFile(backing, Buffer.alloc(8 * MiB, 0xab)); // holds other data: not all zeros
      const dev = await attachLoop(t, backing);
      await tm.waitFor('3 versions of');
      await openRestore(tm, home.id);
      await tm.keys('Tab');
      s = await tm.waitFor(dev);
      await tm.shot('device-list');
      t.regex(s, new RegExp(`${dev}\\s+8\\.00 MiB\\s+loop of .*yes \\(will be overwritten\\)`));
      t.regex(s, new RegExp(`${mdev} .*NO: mounted on ${mnt}`));
      await tm.keyUntil('Down', new RegExp(`> ${dev}\\b`));
      await tm.keys('Enter');
      s = await tm.waitFor('type its name');
      t.regex(s, /ALL DATA on \/dev\/loop\d+ is lost/);
      await tm.type(dev); // the whole path is accepted as well as the name
      await tm.keys('Enter');
      await tm.waitFor('DONE: the restore finished');
      t.is(await sha256File(dev, { start: 0, length: homeImage.size }), homeImage.sha256);

      // A damaged block of home, restored over the device that holds other data: the damaged range is
      // written as zeros (never left holding old data), the rest is exact, and the UI ends with exit code 3.
      await fs.writeFile(backing, Buffer.alloc(8 * MiB, 0xab));
      const victim = path.join(repo.dir, homeObjects[1]!);
      const st = await fs.stat(victim);
      await flipBit(victim, Math.floor(st.size / 2));
      await tm.keys('Enter');
      await tm.waitFor('3 versions of');
      await openRestore(tm, home.id);
      await tm.keys('Tab');
      await tm.waitFor(dev);
      await tm.keyUntil('Down', new RegExp(`> ${dev}\\b`));
      await tm.keys('Enter');
      await tm.waitFor('type its name');
      await tm.type(path.basename(dev));
      await tm.keys('Enter');
      s = await tm.waitFor('FINISHED WITH DAMAGE');
      await tm.shot('restore-damaged-device');
      t.regex(s, /4 Restore DAMAGED/);
      const dmg = /DAMAGED offset (\d+) /.exec(s);
      t.truthy(dmg, s);
      const off = Number(dmg![1]);
      t.true(
        (await readRange(dev, off, MiB)).every((b) => b === 0),
        'the damaged range reads as zeros, not the old 0xab',
      );
      for (let i = 0; i * MiB < homeImage.size; i++) {
        if (i * MiB === off) continue;
        t.is(await sha256File(dev, { start: i * MiB, length: MiB }), await sha256File(homeImage.path, { start: i * MiB, length: MiB }), `block ${i} restored`);
      }
    } else if (process.env.CI === 'true') t.fail('loop devices are needed in CI');

    // Resize to 80x24: everything still fits.
    await tm.keys('Enter');
    await tm.waitFor('3 versions of');
    await tm.run('resize-window', '-t', 'ui', '-x', '80', '-y', '24');
    s = await tm.waitFor(/q quit\s*$/m);
    await tm.waitFor((await tm.screen()).includes('── details') ? '── details' : 'versions of');
    s = await tm.shot('versions-80x24');
    for (const line of s.split('\n')) t.true(line.length <= 80, `line wider than 80 columns: ${line}`);
    t.regex(s, /q quit/);

    // Help, then quit: the terminal is back to the shell with a record of what was done.
    await tm.keys('?');
    await tm.waitFor('blocksafe · help');
    await tm.shot('help');
    await tm.keys('Escape');
    await tm.waitFor('3 versions of');
    await tm.keys('q');
    const damaged = loopDevicesWork();
    await tm.waitFor(damaged ? 'EXIT=3' : 'EXIT=0');
    s = await tm.screen(true);
    await tm.shot('after-quit');
    t.false(s.includes('Filter:'), 'the UI is gone from the terminal');
    t.regex(s, new RegExp(`Restored version ${home.id} .* every block verified`));
    t.regex(s, new RegExp(`Restored version ${v1.id} .* every block verified; ${resumedBytes} bytes written by this run`), 'the resume wrote only the blocks after the checkpoint');
    t.regex(s, /STOPPED at/);
  },
);

run('blocksafe ui in tmux: bookkeeping and scrub from the list (protect, tag, scrub), as the CLI then sees them', async (t) => {
  t.timeout(120_000);
  const dir = await tempDir(t, 'blocksafe-tui-books-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'a.img'), { blockSize: MiB, seed: 'books', blocks: ['text', 'random'] });
  const v = await backupJson(repo, image.path, 'a');
  const tm = new Tmux(t, cleanEnv());
  await tm.start(`cd ${ROOT} && ${COMMAND} ui ${repo.args.join(' ')}; echo "EXIT=$?"`, 100, 30);
  await tm.waitFor('1 version of 1 volume');
  await tm.keys('p');
  let s = await tm.waitFor(`Version ${v.id} is now protected`);
  t.regex(s, new RegExp(`> ${v.id} .*valid protected`));
  await tm.keys('x');
  await tm.waitFor(`Error: Version ${v.id} is protected`);
  await tm.keys('p');
  await tm.waitFor(`Version ${v.id} is no longer protected`);
  await tm.keys('t');
  await tm.waitFor('Tags now: b_daily, b_weekly, b_monthly'); // set by the first backup
  await tm.type('offsite');
  await tm.keys('Enter');
  await tm.waitFor('Tags now: b_daily, b_weekly, b_monthly, offsite');
  await tm.keys('Escape');
  await tm.waitFor(`Tags of ${v.id}: added offsite.`);
  await tm.keys('s');
  await tm.waitFor('Scrub: re-read stored blocks');
  await tm.keys('Enter');
  s = await tm.waitFor(/DONE: all \d+ blocks checked are intact|DAMAGE FOUND/);
  t.regex(s, /DONE: all \d+ blocks checked are intact/);
  await tm.keys('Enter');
  await tm.waitFor('Scrub verified');
  await tm.keys('F10');
  await tm.waitFor('EXIT=0');
  const after = await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env });
  t.deepEqual(after.find((x) => x.id === v.id)!.tags, ['b_daily', 'b_weekly', 'b_monthly', 'offsite']);
  t.false(after.find((x) => x.id === v.id)!.protected);
});

run('blocksafe ui in tmux: the terminal killed mid-restore stops it at its checkpoint (no crash, lock released, resumable)', async (t) => {
  t.timeout(180_000);
  const dir = await tempDir(t, 'blocksafe-tui-kill-');
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'a.img'), { blockSize: MiB, seed: 'kill', blocks: ['random', 'random', 'text', 'random', 'random', 'random', 'text', 'random', 'random', 'random'] });
  const v = await backupJson(repo, image.path, 'a');
  const config = path.join(dir, 'ui.conf');
  await fs.writeFile(config, '[pipeline]\nwrite_limit = 1M\n');
  const target = path.join(dir, 'restored.img');
  const status = path.join(dir, 'status');
  const tm = new Tmux(t, cleanEnv());
  // The shell around the UI outlives the window (it ignores SIGHUP) to record how the UI ended; the UI
  // itself installs its own SIGHUP handler.
  await tm.start(`sh -c 'trap "" HUP; cd ${ROOT} && ${COMMAND} ui ${repo.args.join(' ')} --config ${config} 2>${dir}/stderr; echo $? > ${status}'`, 100, 30);
  await tm.waitFor('1 version of 1 volume');
  await tm.keys('Enter');
  await tm.waitFor('Where should it be restored to?');
  await tm.type(target);
  await tm.keys('Enter');
  await tm.waitFor('Press Enter to start the restore');
  await tm.keys('Enter');
  await tm.waitFor(/Restoring .* ([2-9]\d)\.\d %/s);
  await tm.run('kill-window', '-t', 'ui');
  const end = Date.now() + DEADLINE_MS;
  let code = '';
  while (!(code = (await fs.readFile(status, 'utf8').catch(() => '')).trim()) && Date.now() < end) await poll();
  t.is(code, '1', `the UI exits 1 (a restore was left stopped), not by a signal (139 = segfault); stderr: ${await fs.readFile(path.join(dir, 'stderr'), 'utf8').catch(() => '')}`);
  // The lock is released and the restore state kept: --resume continues from the checkpoint.
  const r = await runJson<{ bytes_written: number }>(['restore', ...repo.args, '--resume', v.id, target], { env: repo.env });
  t.true(r.bytes_written > 0 && r.bytes_written < image.size, `resumed, not restarted: ${r.bytes_written} of ${image.size} bytes written`);
  t.is(await sha256File(target), image.sha256);

  // Idle (nothing running): the window killed, the UI ends cleanly with 0.
  const idleStatus = path.join(dir, 'idle-status');
  const ti = new Tmux(t, cleanEnv());
  await ti.start(`sh -c 'trap "" HUP; cd ${ROOT} && ${COMMAND} ui ${repo.args.join(' ')} 2>${dir}/idle-stderr; echo $? > ${idleStatus}'`, 100, 30);
  await ti.waitFor('1 version of 1 volume');
  await ti.run('kill-window', '-t', 'ui');
  const idleEnd = Date.now() + DEADLINE_MS;
  while (!(code = (await fs.readFile(idleStatus, 'utf8').catch(() => '')).trim()) && Date.now() < idleEnd) await poll();
  t.is(code, '0', `idle UI after its terminal vanished; stderr: ${await fs.readFile(path.join(dir, 'idle-stderr'), 'utf8').catch(() => '')}`);
});

run('blocksafe ui in tmux: a repository that does not open exits 1; a long list keeps the selected row visible with a two-line error', async (t) => {
  t.timeout(180_000);
  const dir = await tempDir(t, 'blocksafe-tui-list-');
  const tm = new Tmux(t, cleanEnv());
  await tm.start(`cd ${ROOT} && ${COMMAND} ui --repo ${dir}/nothing-here; echo "EXIT=$?"`, 100, 30);
  await tm.waitFor(/Error: .*nothing-here/);
  await tm.keys('q');
  await tm.waitFor('EXIT=1');
  await tm.run('kill-server').catch(() => undefined);

  // 27 versions of three volumes; the oldest of the last volume is protected and selected last.
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'a.img'), { blockSize: MiB, seed: 'list', blocks: ['text'] });
  const ids: Record<string, string[]> = { alpha: [], beta: [], gamma: [] };
  await Promise.all(
    Object.keys(ids).map(async (name) => {
      for (let i = 0; i < 9; i++) ids[name]!.push((await backupJson(repo, image.path, name)).id);
    }),
  );
  const last = ids.gamma![0]!;
  await runJson(['protect', ...repo.args, last], { env: repo.env });
  for (const [columns, rows] of [
    [100, 30],
    [80, 24],
  ] as const) {
    const tl = new Tmux(t, cleanEnv());
    await tl.start(`cd ${ROOT} && ${COMMAND} ui ${repo.args.join(' ')}; echo "EXIT=$?"`, columns, rows);
    await tl.waitFor('27 versions of 3 volumes');
    await tl.keys('G');
    let s = await tl.waitFor(new RegExp(`^> ${last} `, 'm'));
    await tl.keys('x');
    s = await tl.waitFor(`Error: Version ${last} is protected`);
    await tl.shot(`long-list-error-${columns}x${rows}`);
    const ls = s.split('\n');
    t.true(
      ls.some((l) => l.startsWith(`> ${last} `)),
      `the selected row is visible at ${columns}x${rows}:\n${s}`,
    );
    t.regex(s, /== gamma/, 'its group header too');
    for (const l of ls) t.true(l.length <= columns);
    await tl.keys('k', 'k');
    s = await tl.waitFor(new RegExp(`^> ${ids.gamma![2]} `, 'm'));
    await tl.keys('q');
    await tl.waitFor('EXIT=0');
    await tl.run('kill-server').catch(() => undefined);
  }
});

/** Whether `dir` is a mount point now (as /proc/self/mountinfo names it). */
function isMountPoint(dir: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === dir);
}

async function pollUntil(what: string, probe: () => boolean): Promise<void> {
  const end = Date.now() + DEADLINE_MS;
  while (!probe()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await poll();
  }
}

const canMount = process.getuid?.() === 0 && existsSync('/dev/fuse');
if (haveTmux && !canMount && process.env.CI === 'true') test('the Mount action of the UI is tested in CI (as root, with /dev/fuse)', (t) => t.fail('not root or no /dev/fuse'));

(canMount ? run : test.serial.skip)('blocksafe ui in tmux: m mounts a version (its data file equals the image), u unmounts it; quitting or a closed terminal unmounts first', async (t) => {
  t.timeout(180_000);
  const dir = await tempDir(t, 'blocksafe-tui-mount-');
  // A passphrase typed into the UI: the mount child must get it from the UI (its environment), not the test.
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'disk.img'), { blockSize: MiB, seed: 'tui-mount', blocks: ['random', 'zero', 'text', { dup: 0 }], tail: { bytes: 54_321, kind: 'random' } });
  const v = await backupJson(repo, image.path, 'disk');
  const tm = new Tmux(t, cleanEnv());
  await tm.start(`cd ${ROOT} && ${COMMAND} ui --repo ${repo.dir}; echo "EXIT=$?"`, 100, 30);
  await tm.waitFor('This repository is encrypted.');
  await tm.type(PASSPHRASE);
  await tm.keys('Enter');
  let s = await tm.waitFor('1 version of 1 volume');
  t.regex(s, /m mount/);

  await tm.keys('m');
  s = await tm.waitFor(/MOUNTED read-only|Error:/);
  await tm.shot('mounted');
  const found = new RegExp(`(/\\S*blocksafe-mount-\\w+)/by_id/${v.id}/data`).exec(s);
  t.truthy(found, s);
  const mnt = found![1]!;
  const data = `${mnt}/by_id/${v.id}/data`;
  t.teardown(() => (isMountPoint(mnt) ? runStatus('umount', ['-l', mnt]).then(() => undefined) : undefined));
  t.true(isMountPoint(mnt), `${mnt} is mounted`);
  t.regex(s.replace(/\s+/g, ' '), new RegExp(`mount -o loop,ro ${data} /mnt`));
  t.is((await runStatus('cmp', [data, image.path])).code, 0, 'the mounted data file equals the backed-up image');

  // A file open in the mount: u says it is busy and leaves it mounted; closed, u unmounts.
  const open = await fs.open(data, 'r');
  await tm.keys('u');
  s = await tm.waitFor(/Error: cannot unmount yet/);
  await tm.shot('mount-busy');
  t.regex(s.replace(/\s+/g, ' '), /press u again/);
  t.true(isMountPoint(mnt), 'still mounted while busy');
  await open.close();
  await tm.keys('u');
  s = await tm.waitFor(`Unmounted version ${v.id} from ${mnt}.`);
  await pollUntil(`${mnt} to leave /proc/self/mountinfo`, () => !isMountPoint(mnt));
  t.false(existsSync(mnt), 'the temporary directory is removed');
  t.regex(s, /1 version of 1 volume/);

  // Mounted again, then q: the UI unmounts before it ends.
  await tm.keys('m');
  s = await tm.waitFor('MOUNTED read-only');
  const again = new RegExp(`(/\\S*blocksafe-mount-\\w+)/by_id/${v.id}/data`).exec(s)![1]!;
  t.teardown(() => (isMountPoint(again) ? runStatus('umount', ['-l', again]).then(() => undefined) : undefined));
  t.true(isMountPoint(again));
  await tm.keys('q');
  await tm.waitFor('EXIT=0');
  t.false(isMountPoint(again), 'unmounted before the UI ended');
  t.false(existsSync(again), 'its directory removed');
  t.regex(await tm.screen(true), new RegExp(`Mounted version ${v.id} .* on ${again} and unmounted it`));
});
