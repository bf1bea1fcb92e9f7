/**
 * Start-up laziness of the CLI (issue 19): src/cli/main.ts loads only the command module a command line
 * needs. Its table must name exactly what the modules register, or a command would vanish from the CLI.
 */
import { spawnSync } from 'node:child_process';
import test from 'ava';
import { Command } from 'commander';
import { COMMAND_MODULES, modulesFor } from '../src/cli/main.js';
import { VERSION } from '../src/version.js';
import { BIN, cliEnv, ROOT } from './helpers.js';

test('the lazy command table names exactly the commands each module registers', async (t) => {
  for (const [key, entry] of Object.entries(COMMAND_MODULES)) {
    const program = new Command('blocksafe');
    (await entry.load()).register(program);
    t.deepEqual(program.commands.map((c) => c.name()).sort(), [...entry.commands].sort(), `module ${key}`);
  }
});

test('a command line loads the one module of its command; help, unknown names and no command load all', (t) => {
  const all = Object.keys(COMMAND_MODULES);
  t.deepEqual(modulesFor(['ls', '--repo', 'R']), ['versions']);
  t.deepEqual(modulesFor(['--repo', 'ls', 'restore', 'v', 't']), ['restore'], 'the value of --repo is not a command');
  t.deepEqual(modulesFor(['-r', 'x', '--debug', 'key', 'add']), ['keys']);
  t.deepEqual(modulesFor(['--repo=ls', 'scrub']), ['integrity']);
  t.deepEqual(modulesFor(['--version']), []);
  t.deepEqual(modulesFor([]), all);
  t.deepEqual(modulesFor(['--help']), all);
  t.deepEqual(modulesFor(['help', 'ls']), all);
  t.deepEqual(modulesFor(['frobnicate']), all);
});

test('--version, -V, --help and an unknown command behave as before', (t) => {
  const run = (...args: string[]) => spawnSync(process.execPath, [BIN, ...args], { cwd: ROOT, env: cliEnv(), encoding: 'utf8' });
  for (const flag of ['--version', '-V']) {
    const r = run(flag);
    t.is(r.status, 0);
    t.is(r.stdout, `${VERSION}\n`);
    t.is(r.stderr, '');
  }
  const debug = run('--debug', '--version'); // through commander
  t.is(debug.stdout, `${VERSION}\n`);
  const help = run('--help');
  t.is(help.status, 0);
  for (const c of Object.values(COMMAND_MODULES).flatMap((e) => e.commands)) t.regex(help.stdout, new RegExp(`^\\s+${c}\\b`, 'm'), c);
  const unknown = run('frobnicate');
  t.is(unknown.status, 2);
  t.regex(unknown.stderr, /^blocksafe: unknown command 'frobnicate'/);
});
