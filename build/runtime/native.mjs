/**
 * Run-time loader of the native addons inside the single executable (bundled into the main script and into
 * the worker script; see build/lib/plugins.mjs for how lmdb's and msgpackr-extract's
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
 *   3. $TMPDIR/blocksafe-<uid>, /tmp/blocksafe-<uid>, /var/tmp/blocksafe-<uid>, /dev/shm/blocksafe-<uid>.
 * A candidate is skipped when /proc/self/mountinfo says its filesystem is mounted `noexec`, when it
 * cannot be created or written (read-only, full, permission), and when the kernel refuses to map code from
 * it anyway (dlopen fails with "failed to map segment" / EPERM: noexec seen too late, SELinux...).
 *
 * Trust (issue 14, item 4: a planted library would run as this user, often root). Two independent layers:
 *   - Directories: every directory used, and each of its ancestors, must belong to this user or root and
 *     be writable by nobody else (ancestors may be sticky, root-owned, world-writable ones such as /tmp).
 *     A candidate failing this is skipped (for BLOCKSAFE_CACHE_DIR: a one-line error), so `sudo -E`
 *     with HOME or XDG_CACHE_HOME in another user's directory falls back to /tmp/blocksafe-0.
 *   - Files: an addon is opened once (O_NOFOLLOW), checked through that descriptor (a regular file of
 *     this user, writable by nobody else, of the embedded size), hashed through it, and loaded through it:
 *     `dlopen("/proc/self/fd/N")`. Whatever happens to the name meanwhile, the code that runs is the code
 *     that was hashed. A file failing any check is replaced by a fresh one written through a new
 *     descriptor (O_EXCL) and loaded through that. The descriptors stay open for the life of the process
 *     (close-on-exec), and worker threads load the same /proc/self/fd paths.
 *   Without /proc (a chroot), the verified file is loaded by its path, which the directory layer makes
 *   safe: nobody but this user and root can change an entry on it.
 * Writes go to a temporary name and are renamed into place, so concurrent first starts and crashes never
 * leave a half-written addon under the final name.
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
const ADVICE =
  'set BLOCKSAFE_CACHE_DIR to a directory of this user that nobody else can write to (nor to any directory above it), on a filesystem mounted without "noexec" (findmnt -o TARGET,OPTIONS lists the mounts)';

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
    let loadable;
    try {
      const dir = trustedDir(candidate, path.join('native', entry.sha256.slice(0, 16)));
      loadable = openVerified(dir, entry, () => embeddedBytes(name, entry));
    } catch (err) {
      if (err instanceof NativeLoadError) throw err;
      failures.push(`${candidate.dir}: ${oneLine(err)}`);
      continue;
    }
    try {
      const exports = dlopen(loadable.loadPath);
      chosenDir = candidate;
      return { exports, file: loadable.loadPath };
    } catch (err) {
      fs.closeSync(loadable.fd);
      if (isNoExec(err)) {
        failures.push(`${candidate.dir}: mounted noexec (${oneLine(err)})`);
        continue;
      }
      const glibc = /(GLIBC|GLIBCXX)_([0-9.]+)' not found/.exec(String(err?.message));
      if (glibc) {
        const needs = manifest().glibc ? `glibc ${manifest().glibc} or newer` : `a newer C library (${glibc[1]}_${glibc[2]})`;
        throw new NativeLoadError(`cannot load the native module ${name}: this system's C library is too old (this blocksafe needs ${needs}): ${oneLine(err)}`, {
          cause: err,
        });
      }
      throw new NativeLoadError(`cannot load the native module ${name} from ${loadable.file}: ${oneLine(err)}`, { cause: err });
    }
  }
  const tried = failures.join('; ');
  if (candidates.length === 1 && candidates[0].explicit) {
    throw new NativeLoadError(`cannot use BLOCKSAFE_CACHE_DIR for the native module ${name} (${tried}); ${ADVICE}`);
  }
  throw new NativeLoadError(`no usable cache directory for the native module ${name} (tried ${tried}); ${ADVICE}`);
}

function embeddedBytes(name, entry) {
  const bytes = new Uint8Array(sea().getAsset(entry.asset));
  if (bytes.length !== entry.size || sha256(bytes) !== entry.sha256) {
    throw new NativeLoadError(`the embedded copy of the native module ${name} is damaged (the executable itself is corrupt: download or build it again)`);
  }
  return bytes;
}

const euid = () => (typeof process.geteuid === 'function' ? process.geteuid() : 0);

/**
 * Why `st` (lstat of directory `dir`) may not be trusted, or undefined when it may. `own`: a directory
 * blocksafe writes into (this user's, writable by nobody else); otherwise an ancestor (this user's or
 * root's; writable by others only when sticky and root's, as /tmp).
 */
function distrust(dir, st, own) {
  const uid = euid();
  if (!st.isDirectory()) return `${dir} is not a directory`;
  if (own ? st.uid !== uid : st.uid !== uid && st.uid !== 0) return `${dir} is owned by uid ${st.uid}, not by this user (uid ${uid})${own ? '' : ' or root'}`;
  if (st.mode & 0o022) {
    if (own || !(st.mode & 0o1000) || st.uid !== 0) return `${dir} is writable by other users (mode ${(st.mode & 0o7777).toString(8)})`;
  }
  return undefined;
}

/**
 * Creates (0700) and checks `candidate.dir/sub`: every ancestor of the candidate directory trusted, the
 * candidate directory and everything below it this user's alone. Returns the real path of `sub`.
 */
export function trustedDir(candidate, sub) {
  if (candidate.within && !fs.statSync(candidate.within).isDirectory()) throw new Error(`${candidate.within} is not a directory`);
  // The nearest existing ancestor and all above it must be trusted before anything is created below.
  let existing = path.dirname(candidate.dir);
  while (!fs.existsSync(existing)) existing = path.dirname(existing);
  const real = fs.realpathSync(existing);
  for (let d = real; ; d = path.dirname(d)) {
    const why = distrust(d, fs.lstatSync(d), false);
    if (why) throw new Error(why);
    if (d === '/') break;
  }
  // Then each missing level, created 0700; the candidate directory and below must be this user's alone.
  const rel = path.relative(existing, path.join(candidate.dir, sub)).split(path.sep);
  const ownFrom = path.relative(existing, candidate.dir).split(path.sep).length - 1;
  let d = real;
  rel.forEach((part, i) => {
    d = path.join(d, part);
    try {
      fs.mkdirSync(d, { mode: 0o700 });
    } catch (err) {
      if (err.code !== 'EEXIST') throw err;
    }
    const why = distrust(d, fs.lstatSync(d), i >= ownFrom);
    if (why) throw new Error(why);
  });
  return d;
}

let procFd;
/** True when /proc/self/fd/N names this process's descriptors (not in a chroot without /proc). */
function procFdWorks(fd) {
  if (procFd === undefined) {
    try {
      const st = fs.fstatSync(fd);
      const viaProc = fs.statSync(`/proc/self/fd/${fd}`);
      procFd = viaProc.ino === st.ino && viaProc.dev === st.dev;
    } catch {
      procFd = false;
    }
  }
  return procFd;
}

function readAllFd(fd, size) {
  const buf = Buffer.allocUnsafe(size + 1);
  let off = 0;
  for (;;) {
    const n = fs.readSync(fd, buf, off, buf.length - off, off);
    if (n === 0) break;
    off += n;
    if (off === buf.length) break; // longer than expected: the size check fails
  }
  return buf.subarray(0, off);
}

/**
 * The addon `entry.file` in the trusted directory `dir`, verified and ready to load: `{ fd, loadPath, file }`.
 * `loadPath` is `/proc/self/fd/<fd>` (the descriptor that was checked and hashed) when /proc works, else
 * the file's path. `bytes()` gives the embedded copy, used when the cached file is missing or fails a check.
 * Exported for test/binary.test.ts (the swap race).
 */
export function openVerified(dir, entry, bytes) {
  const file = path.join(dir, entry.file);
  const uid = euid();
  let fd;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    const st = fs.fstatSync(fd);
    if (st.isFile() && st.uid === uid && (st.mode & 0o022) === 0 && st.size === entry.size && sha256(readAllFd(fd, entry.size)) === entry.sha256) {
      return { fd, file, loadPath: procFdWorks(fd) ? `/proc/self/fd/${fd}` : file };
    }
  } catch {
    // missing, a symlink, unreadable: written afresh below
  }
  if (fd !== undefined) fs.closeSync(fd);
  // A fresh copy through a descriptor of our own (O_EXCL: never someone else's file or link).
  const data = bytes();
  const tmp = `${file}.tmp-${process.pid}-${threadId}-${randomBytes(6).toString('hex')}`;
  fd = fs.openSync(tmp, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o700);
  try {
    let off = 0;
    while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
    fs.fsyncSync(fd);
    fs.fchmodSync(fd, 0o500);
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  const viaFd = procFdWorks(fd);
  try {
    fs.renameSync(tmp, file);
  } catch (err) {
    // Only this user or root can touch the directory; loading through the descriptor is right either way.
    if (!viaFd) {
      fs.closeSync(fd);
      throw err;
    }
  }
  return { fd, file, loadPath: viaFd ? `/proc/self/fd/${fd}` : file };
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
  return String(err?.message ?? err)
    .replace(/\s+/g, ' ')
    .trim();
}

function sha256(bytes) {
  return createHash('sha256').update(bytes).digest('hex');
}
