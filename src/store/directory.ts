import { randomBytes } from 'node:crypto';
import { accessSync, constants as fsc } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { BlocksafeError, describeSystemError, NotFoundError } from '../errors.js';
import { checkObjectName, type BlobStore, type ListOptions, type ObjectInfo } from './blobstore.js';

/**
 * Blob store in a directory, typically on an external USB disk. Objects are written to `tmp/` and renamed
 * into place, so readers see nothing or the whole object. `sync()` fsyncs the new objects and the directories
 * their renames changed; callers sync before the index refers to an object, so a power loss can leave at
 * worst unreferenced, partly written objects (which a later write replaces and cleanup removes).
 */
export class DirectoryStore implements BlobStore {
  readonly location: string;
  private readonly dirtyDirs = new Set<string>();
  /** New objects written but not yet fsynced (see put). */
  private readonly dirtyFiles = new Set<string>();
  private readonly knownDirs = new Set<string>();

  constructor(readonly root: string) {
    this.location = root;
  }

  private file(name: string): string {
    return path.join(this.root, ...checkObjectName(name).split('/'));
  }

  private async ensureDir(dir: string): Promise<void> {
    if (this.knownDirs.has(dir)) return;
    try {
      await fs.mkdir(dir);
      this.dirtyDirs.add(path.dirname(dir));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') {
        await this.ensureDir(path.dirname(dir));
        return this.ensureDir(dir);
      }
      if (code !== 'EEXIST') throw describeSystemError(err, `Repository directory ${dir}`);
    }
    this.knownDirs.add(dir);
  }

  async put(name: string, data: Uint8Array): Promise<void> {
    const dest = this.file(name);
    const tmpDir = path.join(this.root, 'tmp');
    await this.ensureDir(tmpDir);
    await this.ensureDir(path.dirname(dest));
    const tmp = path.join(tmpDir, `${path.basename(dest)}.${process.pid}.${randomBytes(4).toString('hex')}`);
    const replacing = await fs.stat(dest).then(
      () => true,
      () => false,
    );
    const syncFirst = fsyncedBeforeRename(name, replacing);
    try {
      const fh = await fs.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
      try {
        await fh.writeFile(data);
        if (syncFirst) await fh.sync();
      } finally {
        await fh.close();
      }
      await fs.rename(tmp, dest);
    } catch (err) {
      await fs.rm(tmp, { force: true }).catch(() => undefined);
      throw describeSystemError(err, `Writing ${name} to the repository at ${this.root}`);
    }
    if (!syncFirst) this.dirtyFiles.add(dest);
    this.dirtyDirs.add(path.dirname(dest));
  }

  async sync(): Promise<void> {
    const files = [...this.dirtyFiles];
    this.dirtyFiles.clear();
    const dirs = [...this.dirtyDirs];
    this.dirtyDirs.clear();
    try {
      // Batched: the kernel writes many objects back at once instead of one fsync per object in the pipeline.
      for (let i = 0; i < files.length; i += SYNC_PARALLEL) await Promise.all(files.slice(i, i + SYNC_PARALLEL).map((f) => fsyncPath(f)));
      await Promise.all(
        dirs.map((d) =>
          fsyncPath(d, true).catch((err: NodeJS.ErrnoException) => {
            if (err.code !== 'ENOENT') throw err; // a directory removed meanwhile has nothing left to flush
          }),
        ),
      );
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new BlocksafeError(`An object written moments ago vanished from ${this.root} before it was flushed (deleted by another program?); nothing refers to it yet: run the command again.`);
      }
      files.forEach((f) => this.dirtyFiles.add(f));
      dirs.forEach((d) => this.dirtyDirs.add(d));
      throw describeSystemError(err, `Flushing the repository at ${this.root} to disk`);
    }
  }

  async get(name: string): Promise<Buffer> {
    const data = await this.tryGet(name);
    if (data === undefined) throw new NotFoundError(`Object ${name} is missing from the repository at ${this.root}.`);
    return data;
  }

  async tryGet(name: string): Promise<Buffer | undefined> {
    try {
      return await fs.readFile(this.file(name));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw describeSystemError(err, `Reading ${name} from the repository at ${this.root}`);
    }
  }

  async readInto(name: string, out: Uint8Array): Promise<number | undefined> {
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(this.file(name), fsc.O_RDONLY);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw describeSystemError(err, `Reading ${name} from the repository at ${this.root}`);
    }
    try {
      const { size } = await fh.stat();
      if (size > out.length) return size;
      let done = 0;
      while (done < size) {
        const { bytesRead } = await fh.read(out, done, size - done, done);
        if (bytesRead === 0) return done; // shrank while read: the caller sees a short (damaged) object
        done += bytesRead;
      }
      return size;
    } catch (err) {
      throw describeSystemError(err, `Reading ${name} from the repository at ${this.root}`);
    } finally {
      await fh.close();
    }
  }

  async has(name: string): Promise<boolean> {
    return (await this.size(name)) !== undefined;
  }

  async size(name: string): Promise<number | undefined> {
    try {
      return (await fs.stat(this.file(name))).size;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw describeSystemError(err, `Reading ${name} from the repository at ${this.root}`);
    }
  }

  async delete(names: string[]): Promise<void> {
    for (const name of names) {
      const file = this.file(name);
      try {
        await fs.unlink(file);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue; // never written, or gone already
        throw describeSystemError(err, `Deleting ${name} from the repository at ${this.root}`);
      }
      this.dirtyFiles.delete(file);
      this.dirtyDirs.add(path.dirname(file));
    }
  }

  async *list(prefix: string, opts: ListOptions = {}): AsyncIterable<ObjectInfo> {
    const base = prefix.replace(/\/$/, '');
    if (base) checkObjectName(base);
    yield* walk(this.root, base, opts.namesOnly ?? false);
  }

  async close(): Promise<void> {
    await this.sync();
  }

  /** False on a read-only mount or without write permission (then the index cannot live here). */
  writable(): boolean {
    try {
      accessSync(this.root, fsc.W_OK);
      return true;
    } catch {
      return false;
    }
  }

  async removeStaleTemp(olderThanMs: number): Promise<number> {
    const dir = path.join(this.root, 'tmp');
    let removed = 0;
    let names: string[];
    try {
      names = await fs.readdir(dir);
    } catch {
      return 0;
    }
    for (const name of names) {
      const file = path.join(dir, name);
      const st = await fs.stat(file).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs > olderThanMs) {
        await fs.rm(file, { force: true });
        removed++;
      }
    }
    return removed;
  }
}

/** Files are stat'ed this many at a time (a listing of 1,000 manifests is one of every command's costs). */
const STAT_PARALLEL = 64;

async function* walk(root: string, rel: string, namesOnly: boolean): AsyncIterable<ObjectInfo> {
  let entries: import('node:fs').Dirent[];
  try {
    entries = await fs.readdir(path.join(root, rel), { withFileTypes: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return;
    throw describeSystemError(err, `Listing ${rel || 'the repository'} in ${root}`);
  }
  const files: string[] = [];
  for (const e of entries) {
    const child = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) yield* walk(root, child, namesOnly);
    else if (e.isFile()) files.push(child);
  }
  if (namesOnly) {
    for (const name of files) yield { name, size: 0, mtime: 0 };
    return;
  }
  for (let i = 0; i < files.length; i += STAT_PARALLEL) {
    const batch = files.slice(i, i + STAT_PARALLEL);
    const stats = await Promise.all(batch.map((f) => fs.stat(path.join(root, f)).catch(() => undefined)));
    for (let k = 0; k < batch.length; k++) {
      const st = stats[k];
      if (st) yield { name: batch[k]!, size: st.size, mtime: st.mtimeMs }; // else removed while listing
    }
  }
}

const SYNC_PARALLEL = 16;

/**
 * Whether put() fsyncs an object's bytes before renaming it into place (else sync() does, later).
 * - Replacing an object the index may already rely on: its new bytes must be durable before the rename.
 * - Objects found by listing rather than by a reference (manifests, attributes, keys, leases, gc): a crash
 *   after the rename but before sync() must not leave one torn, since nothing tells it from a real one
 *   (found by the torture harness: a torn manifest after a power loss stopped every later cleanup).
 * - A new block object waits for sync(), which runs before the index refers to it: torn, it is unreferenced.
 */
export function fsyncedBeforeRename(name: string, replacing: boolean): boolean {
  return replacing || !name.startsWith('data/');
}

/** fsync of a file or directory by path (Linux flushes the inode whichever descriptor asks). */
export async function fsyncPath(p: string, directory = false): Promise<void> {
  const fh = await fs.open(p, directory ? fsc.O_RDONLY | fsc.O_DIRECTORY : fsc.O_RDONLY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
