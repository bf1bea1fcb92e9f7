/**
 * Run-time loader of the native addons inside the single executable (bundled into the main script and into
 * the worker script; see build/lib/plugins.mjs for how `require('zstd-napi/binding')` and lmdb's
 * `node-gyp-build-optional-packages` are routed here).
 *
 * Node can only `dlopen` a file, so each addon, embedded as a SEA asset, is written once to a cache
 * directory under a content-hashed name and loaded from there:
 *
 *   <cache>/native/<first 16 hex of sha256>/<file name>
 *
 * Cache directory candidates, in order (the first one that works is used for all addons of the process):
 *   1. $BLOCKSAFE_CACHE_DIR, when set: the only candidate (an explicit choice is never silently ignored);
 *   2. $XDG_CACHE_HOME/blocksafe, else $HOME/.cache/blocksafe (home from the password file without HOME);
 *   3. $TMPDIR/blocksafe-<uid>, /tmp/blocksafe-<uid>, /var/tmp/blocksafe-<uid>, /dev/shm/blocksafe-<uid>
 *      (created 0700 and used only when owned by the user and not writable by others).
 * A candidate is skipped when /proc/self/mountinfo says its filesystem is mounted `noexec`, when it
 * cannot be created or written (read-only, full, permission), and when the kernel refuses to map code from
 * it anyway (dlopen fails with "failed to map segment" / EPERM: noexec seen too late, SELinux...). An existing file is used only when its SHA-256 matches the embedded one; otherwise it is
 * rewritten. Writes go to a temporary name and are renamed into place, so concurrent first starts and
 * crashes never leave a half-written addon under the final name.
 *
 * Worker threads get the paths the main thread resolved (see entry.mjs) in
 * `globalThis.__blocksafeNativePaths` and just dlopen them.
 *
 * Outside the single executable (the bundle run by plain `node`, as the build's self-test does) the addons
 * are loaded straight from node_modules, from the paths recorded in the manifest at build time.
 */
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { threadId } from 'node:worker_threads';

/** An error whose message is one sentence for the user (printed as `blocksafe: <message>`). */
export class NativeLoadError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = 'NativeLoadError';
    this.blocksafeNative = true;
  }
}

const MANIFEST_ASSET = 'native-manifest.json';
const ADVICE = 'set BLOCKSAFE_CACHE_DIR to a writable directory on a filesystem mounted without "noexec" (findmnt -o TARGET,OPTIONS lists the mounts)';

/** name -> module.exports, per thread. */
const loaded = new Map();
/** name -> absolute path of the file that was dlopen'ed, per thread. */
const loadedPaths = new Map();
let manifestCache;
let seaModule;
let chosenDir;

function sea() {
  if (seaModule === undefined) {
    try {
      // eslint-disable-next-line no-undef -- CJS bundle: a real require (built-ins only inside the SEA)
      seaModule = require('node:sea');
      if (!seaModule.isSea()) seaModule = null;
    } catch {
      seaModule = null; // node:sea appeared in Node 20.12; older Node runs the bundle outside a SEA only
    }
  }
  return seaModule;
}

/** { addons: { name: { file, sha256, size, asset, source } } } written by build/build-binary.mjs. */
function manifest() {
  if (manifestCache) return manifestCache;
  const s = sea();
  if (s) {
    manifestCache = JSON.parse(s.getAsset(MANIFEST_ASSET, 'utf8'));
  } else {
    // Plain-node run of build/out/*.cjs: the manifest sits next to the bundle.
    // eslint-disable-next-line no-undef
    const here = typeof __filename === 'string' && path.isAbsolute(__filename) ? path.dirname(__filename) : process.cwd();
    manifestCache = JSON.parse(fs.readFileSync(path.join(here, MANIFEST_ASSET), 'utf8'));
  }
  return manifestCache;
}

function entryFor(name) {
  const entry = manifest().addons[name];
  if (!entry) throw new NativeLoadError(`the native module ${name} is not embedded in this executable (build error: rebuild with npm run build:binary)`);
  return entry;
}

function dlopen(file) {
  const mod = { exports: {} };
  process.dlopen(mod, file);
  return mod.exports;
}

/** The loaded addon `name` (module.exports of its .node file). Throws NativeLoadError. */
export function loadNative(name) {
  const have = loaded.get(name);
  if (have) return have;
  const given = globalThis.__blocksafeNativePaths?.[name];
  let exports;
  let file;
  if (given) {
    // A worker thread: the main thread already extracted, verified and loaded this very file.
    file = given;
    try {
      exports = dlopen(file);
    } catch (err) {
      throw new NativeLoadError(`cannot load the native module ${name} from ${file} in a worker thread: ${oneLine(err)}`, { cause: err });
    }
  } else if (!sea()) {
    file = entryFor(name).source;
    exports = dlopen(file);
  } else {
    ({ exports, file } = extractAndLoad(name, entryFor(name)));
  }
  loaded.set(name, exports);
  loadedPaths.set(name, file);
  return exports;
}

/** Paths of the given addons, loading them in this thread first if needed (for the worker prelude). */
export function nativePaths(names) {
  const out = {};
  for (const name of names) {
    loadNative(name);
    out[name] = loadedPaths.get(name);
  }
  return out;
}

/** The cache directory candidates, in order. Exported for tests and `--debug` diagnostics. */
export function cacheCandidates(env = process.env) {
  const explicit = env.BLOCKSAFE_CACHE_DIR;
  if (explicit) return [{ dir: path.resolve(explicit), explicit: true, shared: false }];
  const list = [];
  const xdg = env.XDG_CACHE_HOME;
  let home = env.HOME;
  if (!home || !path.isAbsolute(home)) {
    try {
      home = os.userInfo().homedir;
    } catch {
      home = undefined;
    }
  }
  if (xdg && path.isAbsolute(xdg)) list.push({ dir: path.join(xdg, 'blocksafe'), explicit: false, shared: false });
  else if (home && path.isAbsolute(home) && home !== '/') list.push({ dir: path.join(home, '.cache', 'blocksafe'), explicit: false, shared: false, within: home });
  const uid = typeof process.getuid === 'function' ? process.getuid() : 'user';
  for (const base of [env.TMPDIR, '/tmp', '/var/tmp', '/dev/shm']) {
    if (base && path.isAbsolute(base)) list.push({ dir: path.join(base, `blocksafe-${uid}`), explicit: false, shared: true });
  }
  const seen = new Set();
  return list.filter((c) => {
    // Node 20 pitfall: mkdirSync(..., {recursive: true}) under /proc never returns.
    if (/^\/(proc|sys)(\/|$)/.test(c.dir) || seen.has(c.dir)) return false;
    seen.add(c.dir);
    return true;
  });
}

function extractAndLoad(name, entry) {
  let candidates = cacheCandidates();
  if (chosenDir) candidates = [chosenDir, ...candidates.filter((c) => c.dir !== chosenDir.dir)];
  const failures = [];
  for (const candidate of candidates) {
    if (mountedNoExec(candidate.dir)) {
      failures.push(`${candidate.dir}: mounted noexec`);
      continue;
    }
    let file;
    try {
      file = materialize(candidate, name, entry);
    } catch (err) {
      failures.push(`${candidate.dir}: ${oneLine(err)}`);
      continue;
    }
    try {
      const exports = dlopen(file);
      chosenDir = candidate;
      return { exports, file };
    } catch (err) {
      if (isNoExec(err)) {
        failures.push(`${candidate.dir}: mounted noexec (${oneLine(err)})`);
        continue;
      }
      if (/GLIBC_[0-9.]+' not found|GLIBCXX_/.test(String(err?.message))) {
        throw new NativeLoadError(
          `cannot load the native module ${name}: this system's C library is too old (blocksafe needs glibc 2.34 or newer: Debian 12, Ubuntu 22.04, RHEL 9 or later): ${oneLine(err)}`,
          { cause: err },
        );
      }
      throw new NativeLoadError(`cannot load the native module ${name} from ${file}: ${oneLine(err)}`, { cause: err });
    }
  }
  const tried = failures.join('; ');
  if (candidates.length === 1 && candidates[0].explicit) {
    throw new NativeLoadError(`cannot use BLOCKSAFE_CACHE_DIR for the native module ${name} (${tried}); ${ADVICE}`);
  }
  throw new NativeLoadError(`no usable cache directory for the native module ${name} (tried ${tried}); ${ADVICE}`);
}

let mounts;
/**
 * True when the mount holding `dir` (or its nearest existing ancestor) has the noexec option, from
 * /proc/self/mountinfo, so that such a directory is skipped without writing into it. The dlopen error check
 * in extractAndLoad stays as the backstop (no /proc, or other policies such as SELinux).
 */
function mountedNoExec(dir) {
  try {
    if (mounts === undefined) {
      mounts = fs
        .readFileSync('/proc/self/mountinfo', 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((line) => {
          const f = line.split(' ');
          return { point: f[4].replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8))), noexec: f[5].split(',').includes('noexec') };
        });
    }
    let existing = dir;
    while (!fs.existsSync(existing)) existing = path.dirname(existing);
    existing = fs.realpathSync(existing);
    let best;
    for (const m of mounts) {
      if ((existing === m.point || existing.startsWith(m.point === '/' ? '/' : `${m.point}/`)) && (!best || m.point.length >= best.point.length)) best = m;
    }
    return best?.noexec === true;
  } catch {
    return false;
  }
}

function isNoExec(err) {
  const msg = String(err?.message ?? err);
  return /failed to map segment|operation not permitted|EPERM|EACCES|permission denied/i.test(msg);
}

function oneLine(err) {
  return String(err?.message ?? err).replace(/\s+/g, ' ').trim();
}

/** Makes `candidate.dir` usable; returns the path of the verified addon file inside it. */
function materialize(candidate, name, entry) {
  prepareRoot(candidate);
  const dir = path.join(candidate.dir, 'native', entry.sha256.slice(0, 16));
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const final = path.join(dir, entry.file);
  if (hashOf(final) === entry.sha256) return final;
  const bytes = new Uint8Array(sea().getAsset(entry.asset));
  if (bytes.length !== entry.size || sha256(bytes) !== entry.sha256) {
    throw new NativeLoadError(`the embedded copy of the native module ${name} is damaged (the executable itself is corrupt: download or build it again)`);
  }
  const tmp = `${final}.tmp-${process.pid}-${threadId}-${randomBytes(4).toString('hex')}`;
  let fd;
  try {
    fd = fs.openSync(tmp, 'wx', 0o755);
    let off = 0;
    while (off < bytes.length) off += fs.writeSync(fd, bytes, off, bytes.length - off);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(tmp, final);
  } catch (err) {
    if (fd !== undefined) fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  return final;
}

function prepareRoot(candidate) {
  if (!candidate.shared) {
    // ~/.cache may be created, the home directory itself never (HOME=/nonexistent for system users).
    if (candidate.within && !fs.statSync(candidate.within).isDirectory()) throw new Error(`${candidate.within} is not a directory`);
    fs.mkdirSync(candidate.dir, { recursive: true, mode: 0o700 });
    return;
  }
  // A per-user directory in a world-writable place: never trust one that someone else could write into,
  // since a planted .node file would run as this user (the hash check alone would leave a race).
  try {
    fs.mkdirSync(candidate.dir, { mode: 0o700 });
  } catch (err) {
    if (err.code !== 'EEXIST') throw err;
  }
  const st = fs.lstatSync(candidate.dir);
  const uid = typeof process.getuid === 'function' ? process.getuid() : st.uid;
  if (!st.isDirectory()) throw new Error('exists and is not a directory');
  if (st.uid !== uid) throw new Error(`owned by uid ${st.uid}, not by this user`);
  if (st.mode & 0o022) throw new Error('writable by other users');
}

function hashOf(file) {
  try {
    return sha256(fs.readFileSync(file));
  } catch {
    return undefined;
  }
}

function sha256(bytes) {
  return createHash('sha256').update(bytes).digest('hex');
}
