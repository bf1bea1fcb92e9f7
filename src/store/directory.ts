import { randomBytes } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { describeSystemError, NotFoundError } from '../errors.js';
import type { BlobStore } from './blobstore.js';

/**
 * Blob store in a directory, typically on an external USB disk. Objects are written to `tmp/`, fsynced
 * and renamed into place, so a crash leaves either nothing or the whole object. Renames make their
 * directories dirty; `sync()` fsyncs those directories so the renames themselves survive a power loss.
 */
export class DirectoryStore implements BlobStore {
  readonly location: string;
  private readonly dirtyDirs = new Set<string>();
  private readonly knownDirs = new Set<string>();

  constructor(readonly root: string) {
    this.location = root;
  }

  private file(name: string): string {
    return path.join(this.root, ...name.split('/'));
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
    try {
      const fh = await fs.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
      try {
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fs.rename(tmp, dest);
    } catch (err) {
      await fs.rm(tmp, { force: true }).catch(() => undefined);
      throw describeSystemError(err, `Writing ${name} to the repository at ${this.root}`);
    }
    this.dirtyDirs.add(path.dirname(dest));
  }

  async sync(): Promise<void> {
    const dirs = [...this.dirtyDirs];
    this.dirtyDirs.clear();
    await Promise.all(dirs.map((d) => fsyncDir(d)));
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
      await fs.rm(file, { force: true });
      this.dirtyDirs.add(path.dirname(file));
    }
  }

  async *list(prefix: string): AsyncIterable<string> {
    const base = prefix.replace(/\/$/, '');
    yield* walk(this.root, base);
  }

  async close(): Promise<void> {
    await this.sync();
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

async function* walk(root: string, rel: string): AsyncIterable<string> {
  let entries: import('node:fs').Dirent[];
  try {
    entries = await fs.readdir(path.join(root, rel), { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  for (const e of entries) {
    const child = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) yield* walk(root, child);
    else if (e.isFile()) yield child;
  }
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
