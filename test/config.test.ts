import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { gzipSync } from 'node:zlib';
import test from 'ava';
import { assertCliError, initRepo, MiB, prngBytes, repoState, ROOT, runCli, runJson, runOk, sha256File, tempDir, type VersionJson } from './helpers.js';

const SYSTEM_CONFIG = '/etc/blocksafe/appliance.conf';

/** The documented defaults (other options may be added; these must keep their defaults). */
const DEFAULTS = {
  repository: { repo: '' },
  init: { block_size: 4 * MiB, encryption: 'chacha20-poly1305', compression: 'zstd', compression_level: 1 },
  pipeline: { threads: 0, queue_depth: 0 },
};

interface ConfigJson {
  file: string | null;
  config: Record<string, Record<string, unknown>>;
}

async function writeConf(dir: string, name: string, text: string | Buffer): Promise<string> {
  const file = path.join(dir, name);
  await fs.writeFile(file, text);
  return file;
}

/** A config whose `bad` line is line `line` (comments and other options before it). */
function confWithLineAt(sectionAndBad: string): { text: string; line: number } {
  const head = ['# blocksafe test configuration', '', '[repository]', '; nothing here', 'repo = /nonexistent/repo', ''];
  return { text: [...head, ...sectionAndBad.split('\n'), '', '# end'].join('\n') + '\n', line: head.length + sectionAndBad.split('\n').length };
}

test('config --json prints the defaults when there is no configuration file; config shows every option', async (t) => {
  const r = await runJson<ConfigJson>(['config']);
  if (existsSync(SYSTEM_CONFIG)) t.is(r.file, SYSTEM_CONFIG);
  else t.is(r.file, null);
  t.like(r.config, DEFAULTS);
  // The text form documents every option and is itself a valid configuration file with the same values.
  const text = await runOk(['config']);
  for (const [section, opts] of Object.entries(r.config)) {
    t.true(text.stdout.includes(`[${section}]`), `section [${section}] shown`);
    for (const key of Object.keys(opts)) t.regex(text.stdout, new RegExp(`^${key} = `, 'm'), `${section}.${key} shown`);
  }
  t.regex(text.stdout, /^# /m, 'with descriptions');
});

test('the text form of config is itself a configuration file with the same values', async (t) => {
  const dir = await tempDir(t);
  for (const source of [null, await writeConf(dir, 'custom.conf', '[init]\nblock_size = 1M\n\n[pipeline]\nthreads = 3\n')]) {
    const extra = source ? ['--config', source] : [];
    const effective = await runJson<ConfigJson>(['config', ...extra]);
    const text = await runOk(['config', ...extra]);
    const again = await runJson<ConfigJson>(['config', '--config', await writeConf(dir, 'effective.conf', text.stdout)]);
    t.deepEqual(again.config, effective.config, `config output of ${source ?? 'the defaults'} read back`);
  }
});

test('appliance.conf.example is accepted, documents every option and shows the defaults', async (t) => {
  const example = path.join(ROOT, 'appliance.conf.example');
  const defaults = await runJson<ConfigJson>(['config']);
  const r = await runJson<ConfigJson>(['config', '--config', example]);
  t.is(r.file, example);
  t.deepEqual(r.config, defaults.config);
  const text = await fs.readFile(example, 'utf8');
  const undocumented: string[] = [];
  for (const [section, opts] of Object.entries(r.config)) {
    if (!text.includes(`[${section}]`)) undocumented.push(`[${section}]`);
    for (const key of Object.keys(opts)) if (!new RegExp(`^${key} *=`, 'm').test(text)) undocumented.push(`${section}.${key}`);
  }
  t.deepEqual(undocumented, [], 'every option is in appliance.conf.example');
});

test('values from the configuration file are applied; the file is named in config --json', async (t) => {
  const dir = await tempDir(t);
  const file = await writeConf(dir, 'a.conf', '[init]\nblock_size = 1M\nencryption = none\ncompression = none\n\n[pipeline]\nthreads = 1\nqueue_depth = 3\n');
  const r = await runJson<ConfigJson>(['config', '--config', file]);
  t.is(r.file, file);
  t.like(r.config, { init: { block_size: MiB, encryption: 'none', compression: 'none' }, pipeline: { threads: 1, queue_depth: 3 } });
  // init takes its defaults from [init].
  const repoDir = path.join(dir, 'repo');
  await runOk(['init', '--repo', repoDir, '--config', file]);
  const descriptor = JSON.parse(await fs.readFile(path.join(repoDir, 'blocksafe.json'), 'utf8'));
  t.like(descriptor, { block_size: MiB, encryption: 'none', compression: 'none' });
  // A command-line option beats the file.
  const repo2 = path.join(dir, 'repo2');
  await runOk(['init', '--repo', repo2, '--config', file, '--block-size', '2M']);
  t.is(JSON.parse(await fs.readFile(path.join(repo2, 'blocksafe.json'), 'utf8')).block_size, 2 * MiB);
});

test('an unknown option or section is exit 2 naming file:line', async (t) => {
  const dir = await tempDir(t);
  for (const [bad, what] of [
    ['[init]\nblock_size = 4M\nblocksize = 4M', /blocksize/],
    ['[pipeline]\nthreads = 1\nthread = 2', /thread/],
    ['[frobnicator]\nkeep = 3', /frobnicator/],
    ['[Init]\nblock_size = 4M', /Init/],
  ] as const) {
    const { text, line } = confWithLineAt(bad);
    // the unknown section is named at its header line, an unknown key at its own line
    const expectedLine = bad.startsWith('[frobnicator]') || bad.startsWith('[Init]') ? line - 1 : line;
    const file = await writeConf(dir, 'unknown.conf', text);
    const msg = assertCliError(t, await runCli(['config', '--config', file]), 2, what);
    t.true(msg.startsWith(`${file}:${expectedLine}:`), `names ${file}:${expectedLine}: ${msg}`);
  }
});

test('a bad value is exit 2 naming file:line and the value', async (t) => {
  const dir = await tempDir(t);
  for (const bad of [
    '[init]\nblock_size = banana',
    '[init]\nencryption = rot13',
    '[init]\ncompression = lzma',
    '[init]\ncompression_level = 0',
    '[pipeline]\nthreads = two',
    '[pipeline]\nqueue_depth = -1',
    '[pipeline]\nthreads =',
  ]) {
    const { text, line } = confWithLineAt(bad);
    const file = await writeConf(dir, 'bad.conf', text);
    const value = bad.split('=')[1]!.trim();
    const msg = assertCliError(t, await runCli(['config', '--config', file]), 2);
    t.true(msg.startsWith(`${file}:${line}:`), `names ${file}:${line}: ${msg}`);
    if (value) t.true(msg.includes(value), `names the value ${value}: ${msg}`);
  }
});

test('a block size that init would refuse is already a bad value in the configuration', async (t) => {
  const dir = await tempDir(t);
  for (const bad of ['[init]\nblock_size = 3M', '[init]\nblock_size = 1K', '[init]\nblock_size = 128M']) {
    const { text, line } = confWithLineAt(bad);
    const file = await writeConf(dir, 'bs.conf', text);
    const msg = assertCliError(t, await runCli(['config', '--config', file]), 2);
    t.true(msg.startsWith(`${file}:${line}:`), `names ${file}:${line}: ${msg}`);
  }
});

/** Text without NUL bytes or newlines, starting with a terminal control sequence (clear screen). */
function garbageText(): Buffer {
  const b = Buffer.from(prngBytes('config', 'garbage', 400).map((x) => (x === 0 || x === 10 ? 0x41 : x)));
  b.write('\x1b[2J', 0, 'latin1');
  return b;
}

test('garbage, binary and foreign files are exit 2 with one line naming the file', async (t) => {
  const dir = await tempDir(t);
  const files: [string, string | Buffer][] = [
    ['binary.conf', prngBytes('config', 'binary', 4096)],
    ['gzip.conf', gzipSync(await fs.readFile(path.join(ROOT, 'package.json')))],
    ['garbage.conf', garbageText()],
    ['package.json', await fs.readFile(path.join(ROOT, 'package.json'))],
    ['script.conf', '#!/bin/sh\necho hello\n'],
  ];
  for (const [name, content] of files) {
    const file = await writeConf(dir, name, content);
    const msg = assertCliError(t, await runCli(['config', '--config', file]), 2);
    t.true(msg.includes(file), `${name}: names the file: ${msg}`);
  }
});

test('control characters from a garbage file are not echoed into the error message', async (t) => {
  const dir = await tempDir(t);
  const file = await writeConf(dir, 'garbage.conf', garbageText());
  const r = await runCli(['config', '--config', file]);
  assertCliError(t, r, 2);
  t.false(/[\x00-\x08\x0b-\x1f\x7f]/.test(r.stderr.replace(/\n$/, '')), `no control characters: ${JSON.stringify(r.stderr)}`);
});

test('a key given twice whose second value is bad: the bad line is named, not the first', async (t) => {
  const dir = await tempDir(t);
  const twice = await writeConf(dir, 'twice.conf', '[pipeline]\nthreads = 2\nthreads = two\n');
  const msg = assertCliError(t, await runCli(['config', '--config', twice]), 2, /two/);
  t.true(msg.startsWith(`${twice}:3:`), msg);
});

test('an unknown dotted section [init.sub] is named with its line (not line 0) and its full name', async (t) => {
  const dir = await tempDir(t);
  const dotted = await writeConf(dir, 'dotted.conf', '[init.sub]\nx = 1\n');
  const msg = assertCliError(t, await runCli(['config', '--config', dotted]), 2);
  t.true(msg.startsWith(`${dotted}:1:`), msg);
  t.true(msg.includes('init.sub'), msg);
});

test('[__proto__] is an unknown section like any other', async (t) => {
  const dir = await tempDir(t);
  const proto = await writeConf(dir, 'proto.conf', '[__proto__]\nx = 1\n');
  const msg = assertCliError(t, await runCli(['config', '--config', proto]), 2);
  t.true(msg.startsWith(`${proto}:1:`), msg);
});

test('a file saved with a UTF-8 byte-order mark is read like one without (or refused naming line 1, never line 0)', async (t) => {
  const dir = await tempDir(t);
  const bom = await writeConf(dir, 'bom.conf', '\ufeff[pipeline]\nthreads = 2\n');
  const r = await runCli(['config', '--config', bom, '--json']);
  if (r.code === 0) t.is(JSON.parse(r.stdout).config.pipeline.threads, 2);
  else t.true(assertCliError(t, r, 2).startsWith(`${bom}:1:`), r.stderr);
});

test('boolean options accept true and false (the spelling appliance.conf.example and `config` use)', async (t) => {
  const dir = await tempDir(t);
  const defaults = await runJson<ConfigJson>(['config']);
  const bools = Object.entries(defaults.config).flatMap(([section, opts]) =>
    Object.entries(opts)
      .filter(([, v]) => typeof v === 'boolean')
      .map(([key]) => [section, key] as const),
  );
  t.true(bools.length > 0, 'there are boolean options');
  for (const value of [true, false]) {
    const text = bools.map(([section, key]) => `[${section}]\n${key} = ${value}\n`).join('\n');
    const r = await runCli(['config', '--json', '--config', await writeConf(dir, `${value}.conf`, text)]);
    t.is(r.code, 0, `${text} -> ${r.stderr}`);
    if (r.code === 0) for (const [section, key] of bools) t.is(JSON.parse(r.stdout).config[section][key], value, `${section}.${key}`);
  }
});

test('[repository] repo lets commands run without --repo; --repo and BLOCKSAFE_REPO take precedence', async (t) => {
  const dir = await tempDir(t);
  const repoDir = path.join(dir, 'repo');
  const conf = await writeConf(dir, 'repo.conf', `[repository]\nrepo = ${repoDir}\n\n[init]\nencryption = none\n`);
  await runOk(['init', '--config', conf]);
  t.true(existsSync(path.join(repoDir, 'blocksafe.json')));
  const src = await writeConf(dir, 'src.img', prngBytes('config', 'src', 100_000));
  const id = (await runOk(['backup', '--config', conf, src, 'vol'])).stdout.trim();
  t.regex(id, /^[a-z0-9]+$/);
  const listed = await runJson<{ id: string }[]>(['ls', '--config', conf]);
  t.deepEqual(
    listed.map((v) => v.id),
    [id],
  );
  const out = path.join(dir, 'out.img');
  await runOk(['restore', '--config', conf, id, out]);
  t.is(await sha256File(out), await sha256File(src));

  // BLOCKSAFE_REPO beats the file, --repo beats both.
  const other = path.join(dir, 'other');
  await initRepo(other, { encryption: 'none' });
  t.deepEqual(await runJson(['ls', '--config', conf], { env: { BLOCKSAFE_REPO: other } }), []);
  t.deepEqual(await runJson(['ls', '--config', conf, '--repo', other], { env: { BLOCKSAFE_REPO: repoDir } }), []);
  t.is((await runJson<VersionJson[]>(['ls', '--config', conf, '--repo', repoDir], { env: { BLOCKSAFE_REPO: other } })).length, 1);
});

test('BLOCKSAFE_CONFIG is honoured and --config beats it', async (t) => {
  const dir = await tempDir(t);
  const a = await writeConf(dir, 'a.conf', '[pipeline]\nthreads = 3\n');
  const b = await writeConf(dir, 'b.conf', '[pipeline]\nthreads = 5\n');
  const viaEnv = await runJson<ConfigJson>(['config'], { env: { BLOCKSAFE_CONFIG: a } });
  t.is(viaEnv.file, a);
  t.is(viaEnv.config.pipeline!.threads, 3);
  const both = await runJson<ConfigJson>(['config', '--config', b], { env: { BLOCKSAFE_CONFIG: a } });
  t.is(both.file, b);
  t.is(both.config.pipeline!.threads, 5);
  // The repository location from the environment's config file.
  const repoDir = path.join(dir, 'repo');
  await initRepo(repoDir, { encryption: 'none' });
  const withRepo = await writeConf(dir, 'r.conf', `[repository]\nrepo = ${repoDir}\n`);
  t.deepEqual(await runJson(['ls'], { env: { BLOCKSAFE_CONFIG: withRepo } }), []);
  // A broken file named by the environment is an error too.
  const broken = await writeConf(dir, 'broken.conf', '[pipeline]\nthreads = many\n');
  assertCliError(t, await runCli(['config'], { env: { BLOCKSAFE_CONFIG: broken } }), 2, /broken\.conf:2/);
});

test('a missing configuration file named by --config or BLOCKSAFE_CONFIG is exit 2', async (t) => {
  const dir = await tempDir(t);
  const missing = path.join(dir, 'nope.conf');
  assertCliError(t, await runCli(['config', '--config', missing]), 2, /nope\.conf/);
  assertCliError(t, await runCli(['config'], { env: { BLOCKSAFE_CONFIG: missing } }), 2, /nope\.conf/);
});

test('every command rejects a broken or missing --config, even with --repo, and changes nothing', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none' });
  const src = await writeConf(dir, 'src.img', prngBytes('config', 'cmd', 10_000));
  const id = (await runOk(['backup', ...repo.args, src, 'vol'])).stdout.trim();
  const before = await repoState(repo);
  const broken = await writeConf(dir, 'broken.conf', 'this is not a configuration file\n');
  const missing = path.join(dir, 'missing.conf');
  for (const [conf, commands] of [
    [broken, [['ls'], ['show', id], ['stats'], ['backup', src, 'vol'], ['restore', id, path.join(dir, 'out.img')], ['rm', id]]],
    [missing, [['ls'], ['backup', src, 'vol']]],
  ] as const) {
    for (const [cmd, ...rest] of commands) {
      assertCliError(t, await runCli([cmd!, ...repo.args, '--config', conf, ...rest]), 2, /\.conf/);
    }
  }
  t.false(existsSync(path.join(dir, 'out.img')));
  t.deepEqual(await repoState(repo), before);
});
