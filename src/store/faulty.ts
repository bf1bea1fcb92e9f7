import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlocksafeError, describeSystemError, NotFoundError, UsageError } from '../errors.js';
import { checkObjectName, type BlobStore, type ObjectInfo } from './blobstore.js';
import { DirectoryStore, fsyncedBeforeRename } from './directory.js';

/**
 * TEST-ONLY fault injection for the torture harness (test/torture*, docs/TORTURE.md).
 *
 * Enabled by BLOCKSAFE_TEST_FAULTS (a JSON FaultSpec) and only when BLOCKSAFE_TEST_FAULTS_GUARD is exactly
 * FAULT_GUARD as well; the spec alone is refused with a usage error, so a stray variable can never silently
 * damage a user's repository. No configuration file reaches this module.
 *
 * The wrapper patches the methods of the store instance (so `instanceof DirectoryStore` and the index
 * location still work) and, for each operation kind, counts calls in this process: the Nth matching call
 * fails, returns damaged bytes, or kills the process (power loss).
 *
 * Power-loss model (DirectoryStore only; see recoverPowerLoss): every mutating call is written first to an
 * fsynced journal, with hard links keeping the bytes a rename or unlink would lose. DirectoryStore's rules:
 * - put of a NEW block object: written to tmp/ without fsync, renamed into place; file and directory are
 *   fsynced only by a later sync(). Until then both its directory entry and its data may be lost.
 * - put REPLACING an object, or of any object outside data/ (fsyncedBeforeRename): data fsynced before the
 *   rename; the rename itself needs the directory fsync of sync(). Until then the old state may come back.
 * - delete: unlink; durable after the directory fsync of sync(). Until then the object may come back.
 * - new directories: their entry in the parent is fsynced by sync().
 * recoverPowerLoss then rolls back what the kernel could have lost: metadata operations are kept as an
 * ordered prefix (ext4's journal commits them in order; a completed sync() commits every earlier one), the
 * rest undone newest first; a kept new object whose data was never fsynced may be left torn (truncated).
 * What it cannot model: the LMDB index (its own fsyncs, page cache and mmap are outside the store; the
 * harness instead deletes or rolls back the index directory after a crash), writes the engine does in the
 * repository directory without the store, reordering inside one file, and a disk that lies about fsync.
 */

export const FAULT_ENV = 'BLOCKSAFE_TEST_FAULTS';
export const FAULT_GUARD_ENV = 'BLOCKSAFE_TEST_FAULTS_GUARD';
export const FAULT_GUARD = 'i-am-the-torture-harness';

export type FaultOp = 'put' | 'get' | 'list' | 'delete' | 'sync';
export type FaultKind = 'eio' | 'timeout' | 'enospc' | 'short' | 'bitflip' | 'truncate' | 'powerloss';

export interface Fault {
  op: FaultOp;
  /** 1-based: the Nth call of `op` (matching `prefix`) in this process. */
  nth: number;
  kind: FaultKind;
  /** Only names starting with this count (e.g. "data/"). */
  prefix?: string;
}

export interface FaultSpec {
  faults: Fault[];
  /** Only the store at this location is wrapped (copy opens two). Default: every store. */
  root?: string;
  /** Journal file for the power-loss model (directory stores); its hard links go to `<journal>.d/`. */
  journal?: string;
  /** One line per fault that fired is appended here (the harness counts them). */
  log?: string;
}

/** Wraps `store` when the test-only environment asks for it; otherwise returns it untouched. */
export function injectFaultsFromEnv<T extends BlobStore>(store: T, env: NodeJS.ProcessEnv = process.env): T {
  const raw = env[FAULT_ENV];
  if (!raw) return store;
  if (env[FAULT_GUARD_ENV] !== FAULT_GUARD) {
    throw new UsageError(`${FAULT_ENV} is a test-only setting that injects failures; unset it (it is refused outside the torture harness).`);
  }
  let spec: FaultSpec;
  try {
    spec = JSON.parse(raw) as FaultSpec;
  } catch {
    throw new UsageError(`${FAULT_ENV} is not valid JSON.`);
  }
  if (spec.root && path.resolve(spec.root) !== path.resolve(store.location)) return store;
  new FaultInjector(store, spec).install();
  return store;
}

/** What the journal holds, one JSON object per line. */
type JournalEntry =
  | { t: 'put'; seq: number; inst: string; file: string; existed: boolean; backup?: string; dirs: string[]; dataSynced: boolean }
  | { t: 'del'; seq: number; inst: string; file: string; backup: string }
  | { t: 'done'; seq: number }
  | { t: 'sync-begin'; seq: number; inst: string }
  | { t: 'sync-end'; seq: number; begin: number };

class Journal {
  private seq = 0;
  private links = 0;
  readonly inst = `${process.pid}-${randomBytes(3).toString('hex')}`;
  private readonly fd: number;
  private readonly linkDir: string;

  constructor(readonly file: string) {
    this.linkDir = `${file}.d`;
    fs.mkdirSync(this.linkDir, { recursive: true });
    this.fd = fs.openSync(file, 'a');
    // Sequence numbers continue across processes: one journal spans a whole schedule.
    const text = fs.readFileSync(file, 'utf8');
    for (const line of text.split('\n')) if (line) this.seq = Math.max(this.seq, (JSON.parse(line) as { seq: number }).seq);
  }

  next(): number {
    return ++this.seq;
  }

  /** Appends and fsyncs one entry before the operation it describes starts. */
  write(e: JournalEntry): void {
    fs.writeSync(this.fd, JSON.stringify(e) + '\n');
    fs.fsyncSync(this.fd);
  }

  /** Keeps the inode of `file` reachable (hard link, or a copy across filesystems); returns the link. */
  keep(file: string): string | undefined {
    const link = path.join(this.linkDir, `${this.inst}-${++this.links}`);
    try {
      fs.linkSync(file, link);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return undefined;
      if (code !== 'EXDEV') throw err;
      fs.copyFileSync(file, link);
    }
    return link;
  }
}

class FaultInjector {
  private readonly counts = new Map<FaultOp, number>();
  private readonly journal: Journal | undefined;
  private readonly dir: DirectoryStore | undefined;

  constructor(
    private readonly store: BlobStore,
    private readonly spec: FaultSpec,
  ) {
    this.dir = store instanceof DirectoryStore ? store : undefined;
    this.journal = this.dir && spec.journal ? new Journal(spec.journal) : undefined;
  }

  /** The fault due for this call of `op` on `name`, counting the call. */
  private due(op: FaultOp, name = ''): Fault | undefined {
    const relevant = this.spec.faults.filter((f) => f.op === op && (!f.prefix || name.startsWith(f.prefix)));
    if (relevant.length === 0) return undefined;
    const n = (this.counts.get(op) ?? 0) + 1;
    this.counts.set(op, n);
    return relevant.find((x) => x.nth === n);
  }

  /** Notes a fault that took effect (the harness counts these lines). */
  private record(f: Fault, name: string): void {
    if (!this.spec.log) return;
    const fd = fs.openSync(this.spec.log, 'a');
    try {
      fs.writeSync(fd, JSON.stringify({ ...f, name, pid: process.pid }) + '\n');
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Throws the error the real store would give for `kind` (or dies, for power loss). */
  private fail(f: Fault, name: string, what: string, kind: FaultKind = f.kind): never {
    this.record(f, name);
    if (kind === 'powerloss') powerLoss();
    const code = kind === 'enospc' ? 'ENOSPC' : kind === 'timeout' ? 'ETIMEDOUT' : 'EIO';
    const err = Object.assign(new Error(`${code}: injected by the torture harness`), { code });
    throw describeSystemError(err, what);
  }

  install(): void {
    const s = this.store;
    const orig = {
      put: s.put.bind(s),
      sync: s.sync.bind(s),
      tryGet: s.tryGet.bind(s),
      delete: s.delete.bind(s),
      list: s.list.bind(s),
    };
    const where = s.location;

    s.put = async (name: string, data: Uint8Array): Promise<void> => {
      const f = this.due('put', name);
      if (f) this.fail(f, name, `Writing ${name} to the repository at ${where}`);
      if (!this.journal || !this.dir) return orig.put(name, data);
      const file = path.join(this.dir.root, ...checkObjectName(name).split('/'));
      const dirs = missingDirs(this.dir.root, path.dirname(file));
      const existed = fs.existsSync(file);
      const backup = existed ? this.journal.keep(file) : undefined;
      const seq = this.journal.next();
      // the store's own rule says whether the bytes are durable at the rename (only the entry is pending)
      const dataSynced = fsyncedBeforeRename(name, existed);
      this.journal.write({ t: 'put', seq, inst: this.journal.inst, file, existed: backup !== undefined, backup, dirs, dataSynced });
      await orig.put(name, data);
      this.journal.write({ t: 'done', seq });
    };

    s.sync = async (): Promise<void> => {
      const f = this.due('sync');
      if (f) this.fail(f, '', `Flushing the repository at ${where} to disk`);
      if (!this.journal) return orig.sync();
      const begin = this.journal.next();
      this.journal.write({ t: 'sync-begin', seq: begin, inst: this.journal.inst });
      await orig.sync();
      this.journal.write({ t: 'sync-end', seq: this.journal.next(), begin });
    };

    s.tryGet = async (name: string): Promise<Buffer | undefined> => {
      const f = this.due('get', name);
      if (f && (f.kind === 'eio' || f.kind === 'timeout' || f.kind === 'enospc' || f.kind === 'powerloss')) this.fail(f, name, `Reading ${name} from the repository at ${where}`);
      const data = await orig.tryGet(name);
      if (!f || data === undefined || data.length === 0) return data;
      this.record(f, name);
      const out = Buffer.from(data);
      // short: the read came back incomplete; truncate: the object is cut (same bytes seen, different story)
      if (f.kind === 'short') return out.subarray(0, Math.floor(out.length / 2));
      if (f.kind === 'truncate') return out.subarray(0, Math.max(0, out.length - 1 - (out.length >> 3)));
      const bit = (out.length * 8 * 0.37) | 0;
      out[bit >> 3]! ^= 1 << (bit & 7);
      return out;
    };
    s.get = async (name: string): Promise<Buffer> => {
      const data = await s.tryGet(name);
      if (data === undefined) throw new NotFoundError(`Object ${name} is missing from the repository at ${where}.`);
      return data;
    };

    s.delete = async (names: string[]): Promise<void> => {
      for (const name of names) {
        const f = this.due('delete', name);
        if (f) this.fail(f, name, `Deleting ${name} from the repository at ${where}`);
        if (!this.journal || !this.dir) {
          await orig.delete([name]);
          continue;
        }
        const file = path.join(this.dir.root, ...checkObjectName(name).split('/'));
        const backup = this.journal.keep(file);
        if (backup === undefined) {
          await orig.delete([name]);
          continue;
        }
        const seq = this.journal.next();
        this.journal.write({ t: 'del', seq, inst: this.journal.inst, file, backup });
        await orig.delete([name]);
        this.journal.write({ t: 'done', seq });
      }
    };

    s.list = (prefix: string): AsyncIterable<ObjectInfo> => {
      const f = this.due('list', prefix);
      const fail = (what: string) => f && this.fail(f, prefix, what, listKind(f.kind));
      return {
        async *[Symbol.asyncIterator]() {
          let n = 0;
          for await (const o of orig.list(prefix)) {
            // fails part-way through a listing, as a flaky disk or bucket would
            if (f && ++n > 2) fail(`Listing ${prefix || 'the repository'} in ${where}`);
            yield o;
          }
          fail(`Listing ${prefix || 'the repository'} in ${where}`);
        },
      };
    };
  }
}

/** A listing cannot be bit-flipped: its damaging kinds become an I/O error part-way through. */
function listKind(kind: FaultKind): FaultKind {
  return kind === 'bitflip' || kind === 'truncate' || kind === 'short' ? 'eio' : kind;
}

/** Power fails: the process vanishes at once, with no chance to flush, close or clean up. */
function powerLoss(): never {
  process.kill(process.pid, 'SIGKILL');
  throw new BlocksafeError('power loss'); // not reached
}

/** Directories between `root` and `dir` (inclusive) that do not exist yet, outermost first. */
function missingDirs(root: string, dir: string): string[] {
  const out: string[] = [];
  for (let d = dir; d.length > root.length && !fs.existsSync(d); d = path.dirname(d)) out.unshift(d);
  return out;
}

export interface RecoveryChoice {
  /** 0..1: where the kept prefix of non-durable operations ends (0 = everything not synced is lost). */
  cut: number;
  /** 0..1: chance that a kept new object whose data was never fsynced is left torn. */
  tear: number;
  /** Deterministic randomness for the choices above. */
  random: () => number;
}

export interface RecoveryResult {
  undone: number;
  kept: number;
  torn: string[];
}

/**
 * Rolls a directory store back to what a power loss could have left, from the journal of the processes
 * that ran since the journal was started (see the model at the top of this file), then removes the journal.
 * Run it only when no process uses the repository.
 */
export function recoverPowerLoss(journalFile: string, choice: RecoveryChoice): RecoveryResult {
  const result: RecoveryResult = { undone: 0, kept: 0, torn: [] };
  if (!fs.existsSync(journalFile)) return result;
  const entries = fs
    .readFileSync(journalFile, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as JournalEntry);
  const done = new Set<number>();
  const ops: Extract<JournalEntry, { t: 'put' | 'del' }>[] = [];
  const syncs = new Map<number, string>(); // sync-begin seq → instance
  let metaDurableBefore = 0; // every op done before this position is committed
  const dataSynced = new Set<number>(); // new-object puts whose data its own instance fsynced
  const doneAt = new Map<number, number>(); // op seq → position of its 'done'
  entries.forEach((e, pos) => {
    if (e.t === 'put' || e.t === 'del') ops.push(e);
    else if (e.t === 'done') {
      done.add(e.seq);
      doneAt.set(e.seq, pos);
    } else if (e.t === 'sync-begin') syncs.set(e.seq, e.inst);
    else if (e.t === 'sync-end') {
      const beginPos = entries.findIndex((x) => x.t === 'sync-begin' && x.seq === e.begin);
      const inst = syncs.get(e.begin);
      metaDurableBefore = Math.max(metaDurableBefore, beginPos);
      for (const o of ops) {
        const at = doneAt.get(o.seq);
        if (o.t === 'put' && o.inst === inst && at !== undefined && at < beginPos) dataSynced.add(o.seq);
      }
    }
  });
  const metaDurable = (o: (typeof ops)[number]) => {
    const at = doneAt.get(o.seq);
    return at !== undefined && at < metaDurableBefore;
  };
  const pending = ops.filter((o) => !metaDurable(o));
  const keep = Math.floor(choice.cut * (pending.length + 1) * 0.999999);
  for (const o of pending.slice(keep).reverse()) {
    undo(o);
    result.undone++;
  }
  result.kept = keep;
  // Kept new objects whose data no fsync covered: the directory entry survived, the bytes maybe not.
  const survivors = [...ops.filter(metaDurable), ...pending.slice(0, keep)];
  for (const o of survivors) {
    if (o.t !== 'put' || o.existed || o.dataSynced || dataSynced.has(o.seq) || !done.has(o.seq)) continue;
    if (choice.random() >= choice.tear) continue;
    const st = fs.statSync(o.file, { throwIfNoEntry: false });
    if (!st || st.size === 0) continue;
    fs.truncateSync(o.file, Math.floor(choice.random() * st.size));
    result.torn.push(o.file);
  }
  fs.rmSync(journalFile, { force: true });
  fs.rmSync(`${journalFile}.d`, { recursive: true, force: true });
  return result;
}

function undo(o: Extract<JournalEntry, { t: 'put' | 'del' }>): void {
  if (o.t === 'del') {
    if (!fs.existsSync(o.file)) {
      fs.mkdirSync(path.dirname(o.file), { recursive: true });
      fs.linkSync(o.backup, o.file);
    }
    return;
  }
  if (o.existed && o.backup) {
    fs.renameSync(o.backup, o.file);
    return;
  }
  fs.rmSync(o.file, { force: true });
  for (const d of [...o.dirs].reverse()) {
    try {
      fs.rmdirSync(d);
    } catch {
      // not empty (another object lives there) or gone: stays as it is
    }
  }
}
