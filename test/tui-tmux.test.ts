/**
 * End to end: the real `blocksafe ui` in a real terminal (tmux), on a real repository made with the real CLI.
 * Keys go in with `tmux send-keys`; what the user would see is read with `tmux capture-pane -p` and saved as
 * text screenshots in test-artifacts/tui/. It unlocks the repository with a passphrase typed into the UI,
 * restores a version to a new file and checks its sha256, stops a restore half-way and resumes it, restores
 * over an existing file (typed confirmation) and — where loop devices work — to a block device chosen from
 * the list, then quits and checks the terminal is back to normal.
 *
 * The command under test is `node bin/blocksafe.js`, or $BLOCKSAFE_BIN (e.g. build/out/blocksafe) for the
 * single executable.
 */
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { promisify } from 'node:util';
import test, { type ExecutionContext } from 'ava';
import { attachLoop, backupJson, initRepo, loopDevicesWork, makeImage, MiB, PASSPHRASE, ROOT, runJson, sha256File, tempDir, type ImageLayout, type VersionJson } from './helpers.js';

const execFileP = promisify(execFile);
const ARTIFACTS = path.join(ROOT, 'test-artifacts', 'tui');
const COMMAND = process.env.BLOCKSAFE_BIN ? path.resolve(ROOT, process.env.BLOCKSAFE_BIN) : `${process.execPath} ${path.join(ROOT, 'bin', 'blocksafe.js')}`;
const haveTmux = spawnSync('sh', ['-c', 'command -v tmux'], { stdio: 'ignore' }).status === 0;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

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

  /** Named keys (Enter, Escape, Down, Tab, C-c …). */
  async keys(...keys: string[]): Promise<void> {
    for (const k of keys) {
      await this.run('send-keys', '-t', 'ui', k);
      await sleep(60);
    }
  }

  /** Text typed literally. */
  async type(text: string): Promise<void> {
    await this.run('send-keys', '-t', 'ui', '-l', '--', text);
    await sleep(60);
  }

  /** Waits until the screen contains `what`; fails with the screen. */
  async waitFor(what: string | RegExp, timeoutMs = 15000): Promise<string> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.screen();
      if (typeof what === 'string' ? s.includes(what) : what.test(s)) return s;
      if (Date.now() > end) throw new Error(`timed out waiting for ${String(what)} on the screen:\n${s}`);
      await sleep(100);
    }
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

const run = haveTmux ? test : test.skip;

run('blocksafe ui in tmux: unlock, list, restore to a file (sha256), stop and resume, overwrite with typed name, device, quit', async (t) => {
  t.timeout(90_000);
  const dir = await tempDir(t, 'blocksafe-tui-');
  // 1 MiB blocks keep the images small while a restore still has enough blocks to stop half-way.
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const layout = (seed: string): ImageLayout => ({
    blockSize: MiB,
    seed,
    blocks: ['random', 'zero', 'text', { dup: 0 }, 'random', 'random', 'text', 'random', 'random', 'zero', 'random', 'text'],
    tail: { bytes: 123_457, kind: 'random' },
  });
  const v1Image = await makeImage(path.join(dir, 'root-v1.img'), layout('night-1'));
  const v2Image = await makeImage(path.join(dir, 'root-v2.img'), layout('night-2'));
  const homeImage = await makeImage(path.join(dir, 'home.img'), { blockSize: MiB, seed: 'home', blocks: ['text', 'random', 'random'] });
  // Backups of different volumes may run at the same time; the two of root one after the other.
  const [v1, home] = await Promise.all([backupJson(repo, v1Image.path, 'root', ['--tag', 'keep']), backupJson(repo, homeImage.path, 'home')]);
  const v2 = await backupJson(repo, v2Image.path, 'root');
  // The target is written at 2 MiB/s, so a restore of 12 MiB lasts long enough (~4 s) to be stopped half-way.
  const config = path.join(dir, 'ui.conf');
  await fs.writeFile(config, '[pipeline]\nwrite_limit = 2M\n');

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
  t.regex(s, new RegExp(`${v1.id} \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d [+-]\\d\\d:\\d\\d .*valid\\s+keep`));
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
  await tm.shot('restore-done');
  t.is(await sha256File(target1), homeImage.sha256, 'the restored file equals the backed-up image');

  // Stop a restore half-way with Esc, then resume it: the result is still exact.
  await tm.keys('Enter');
  await tm.waitFor('3 versions of');
  const target2 = path.join(dir, 'restored-root.img');
  await openRestore(tm, v1.id);
  await tm.type(target2);
  await tm.keys('Enter');
  await tm.waitFor('Press Enter to start the restore');
  await tm.keys('Enter');
  await tm.waitFor(/Restoring .*\d+\.\d %/s);
  await tm.shot('restore-progress');
  await tm.keys('Escape');
  await tm.waitFor('Stop the restore?');
  await tm.keys('y');
  s = await tm.waitFor('STOPPED at');
  await tm.shot('restore-stopped');
  t.notRegex(s, /STOPPED at 100\.0 %/);
  await tm.keys('r');
  s = await tm.waitFor(/DONE: the restore finished|FINISHED WITH DAMAGE|did not finish/);
  t.regex(s, /DONE/);
  await tm.shot('restore-resumed-done');
  t.is(await sha256File(target2), v1Image.sha256, 'the stopped and resumed restore is exact');

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

  // A block device from the list (a loop device over a file), where this machine allows it.
  if (loopDevicesWork()) {
    const backing = path.join(dir, 'disk.img');
    await fs.writeFile(backing, Buffer.alloc(0));
    await fs.truncate(backing, 8 * MiB);
    const dev = await attachLoop(t, backing);
    await tm.keys('Enter');
    await tm.waitFor('3 versions of');
    await openRestore(tm, home.id);
    await tm.keys('Tab');
    s = await tm.waitFor(dev);
    await tm.shot('device-list');
    t.regex(s, new RegExp(`${dev}\\s+8\\.00 MiB\\s+loop of .*yes \\(will be overwritten\\)`));
    // Walk to our device and choose it.
    for (let i = 0; i < 40 && !new RegExp(`> ${dev}\\b`).test(await tm.screen()); i++) await tm.keys('Down');
    await tm.keys('Enter');
    s = await tm.waitFor('type its name');
    t.regex(s, /ALL DATA on \/dev\/loop\d+ is lost/);
    await tm.type(path.basename(dev));
    await tm.keys('Enter');
    await tm.waitFor('DONE: the restore finished');
    t.is(await sha256File(dev, { start: 0, length: homeImage.size }), homeImage.sha256);
  }

  // Bookkeeping and scrub from the list, on the real engine: protect, tag, scrub one version.
  await tm.keys('Enter');
  await tm.waitFor('3 versions of');
  await tm.keys('/');
  await tm.type(v2.id);
  await tm.keys('Enter');
  await tm.waitFor('1 shown');
  await tm.keys('p');
  s = await tm.waitFor(`Version ${v2.id} is now protected`);
  t.regex(s, new RegExp(`> ${v2.id} .*valid protected`));
  await tm.keys('x');
  await tm.waitFor(`Error: Version ${v2.id} is protected`);
  await tm.keys('p');
  await tm.waitFor(`Version ${v2.id} is no longer protected`);
  await tm.keys('t');
  await tm.waitFor('Tags now: none');
  await tm.type('offsite');
  await tm.keys('Enter');
  await tm.waitFor('Tags now: offsite');
  await tm.keys('Escape');
  s = await tm.waitFor(`Tags of ${v2.id}: added offsite.`);
  t.regex(s, new RegExp(`> ${v2.id} .*valid\\s+offsite`));
  await tm.keys('s');
  await tm.waitFor('Scrub: re-read stored blocks');
  await tm.keys('Enter');
  s = await tm.waitFor(/DONE: all \d+ blocks checked are intact|DAMAGE FOUND/);
  await tm.shot('scrub-done');
  t.regex(s, /DONE: all \d+ blocks checked are intact/);
  await tm.keys('Enter');
  await tm.waitFor('Scrub verified');
  await tm.keys('Escape'); // clear the filter

  // Resize to 80x24: everything still fits.
  await tm.waitFor('3 versions of');
  await tm.run('resize-window', '-t', 'ui', '-x', '80', '-y', '24');
  await sleep(400);
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
  await tm.waitFor('EXIT=0');
  s = await tm.screen(true);
  await tm.shot('after-quit');
  t.false(s.includes('Filter:'), 'the UI is gone from the terminal');
  t.regex(s, new RegExp(`Restored version ${home.id} .* every block verified`));
  t.regex(s, new RegExp(`Restored version ${v1.id} .* every block verified`));
  t.regex(s, /STOPPED at/);

  // What the UI changed is what the CLI sees.
  const after = await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env });
  const v2After = after.find((v) => v.id === v2.id)!;
  t.deepEqual(v2After.tags, ['offsite']);
  t.false(v2After.protected);
});
