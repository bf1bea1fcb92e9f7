import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { Worker } from 'node:worker_threads';
import { BlocksafeError, RefusedError, UsageError } from '../errors.js';

/**
 * The /dev/fuse side of a mount, without libfuse or a native addon (docs/MOUNT.md):
 *  - the device is opened here and mounted by util-linux mount(8), which gets the descriptor as its fd 3
 *    (`-o fd=3`): the kernel binds the open file description to the new mount, which this process shares;
 *  - requests are read by a small worker thread in blocking reads (the device hands out one request per
 *    read(2) and wants a buffer as large as the largest request), each posted to the main thread;
 *  - replies are written from the main thread (a write to /dev/fuse never waits).
 * Mounting this way needs root (CAP_SYS_ADMIN); fusermount3 would pass the descriptor over a Unix socket
 * (SCM_RIGHTS), which Node cannot receive.
 */

/** The reader thread: CommonJS evaluated in place, so it works from the single executable too. */
const READER = `
const fs = require('node:fs');
const { workerData, parentPort } = require('node:worker_threads');
const buf = Buffer.alloc(workerData.bufferSize);
for (;;) {
  let n;
  try {
    n = fs.readSync(workerData.fd, buf, 0, buf.length, null);
  } catch (e) {
    // ENOENT: the request was interrupted before we read it; EINTR: a signal. Anything else ends the session.
    if (e.code === 'ENOENT' || e.code === 'EINTR' || e.code === 'EAGAIN') continue;
    parentPort.postMessage({ end: e.code || String(e) });
    break;
  }
  const copy = new Uint8Array(n);
  copy.set(buf.subarray(0, n));
  parentPort.postMessage(copy, [copy.buffer]);
}
`;

export interface FuseDeviceEvents {
  request(b: Buffer): void;
  /** The connection ended (ENODEV after unmount, or another error code). */
  end(code: string): void;
}

export class FuseDevice {
  private worker: Worker | null = null;
  private closed = false;
  private readerEnded = false;

  private constructor(
    readonly fd: number,
    readonly mountpoint: string,
  ) {}

  /** Opens /dev/fuse and mounts it on `mountpoint` (an existing directory, checked by the caller). */
  static async mount(mountpoint: string, opts: { readOnly: boolean; allowOther: boolean; fsname: string }): Promise<FuseDevice> {
    if (process.getuid?.() !== 0) {
      throw new RefusedError('blocksafe mount needs root (it mounts a FUSE file system with mount(8)); run it with sudo, or use "blocksafe nbd" as another user.');
    }
    let fd: number;
    try {
      fd = fs.openSync('/dev/fuse', 'r+');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new BlocksafeError(
        code === 'ENOENT' || code === 'ENODEV' || code === 'ENXIO'
          ? 'FUSE is not available on this system (/dev/fuse is missing): load it with "modprobe fuse" (in a container, pass --device /dev/fuse).'
          : `Cannot open /dev/fuse: ${(err as Error).message}.`,
      );
    }
    const options = ['fd=3', 'rootmode=40000', 'user_id=0', 'group_id=0', 'default_permissions', opts.readOnly ? 'ro' : 'rw', 'nodev', 'nosuid'];
    if (opts.allowOther) options.push('allow_other');
    // -i: mount(2) directly, no mount.fuse helper (which would treat the source as a program to run).
    const r = await run('mount', ['-i', '-t', 'fuse.blocksafe', '-o', options.join(','), opts.fsname, mountpoint], [fd]);
    if (r.code !== 0) {
      fs.closeSync(fd);
      throw new BlocksafeError(`Cannot mount on ${mountpoint}: ${r.stderr.trim().replace(/\s+/g, ' ') || `mount exited with ${r.code}`}.`);
    }
    return new FuseDevice(fd, mountpoint);
  }

  /** Starts reading requests; `bufferSize` must hold the largest request (max_write plus headers). */
  start(bufferSize: number, events: FuseDeviceEvents): void {
    const w = new Worker(READER, { eval: true, workerData: { fd: this.fd, bufferSize } });
    this.worker = w;
    w.on('message', (m: Uint8Array | { end: string }) => {
      if (m instanceof Uint8Array) events.request(Buffer.from(m.buffer, m.byteOffset, m.byteLength));
      else {
        this.readerEnded = true;
        events.end(m.end);
      }
    });
    w.on('error', (err) => {
      this.readerEnded = true;
      events.end(err.message);
    });
  }

  /** Writes one reply (header and body in one writev, as the device requires). False if the kernel refused it. */
  reply(parts: Buffer[]): boolean {
    if (this.closed) return false;
    try {
      fs.writevSync(this.fd, parts);
      return true;
    } catch {
      // ENOENT: the request was interrupted meanwhile; ENODEV: unmounted. Neither is ours to report.
      return false;
    }
  }

  /**
   * Raises the kernel's read-ahead for this mount (FUSE starts at 128 KiB), so sequential readers of a data
   * file send large reads, several at once. Best effort: sysfs may be read-only (containers).
   */
  setReadahead(bytes: number): void {
    const line = fs
      .readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .find((l) => unescapeMountinfo(l.split(' ')[4] ?? '') === this.mountpoint);
    const dev = line?.split(' ')[2];
    if (!dev) return;
    try {
      fs.writeFileSync(`/sys/class/bdi/${dev}/read_ahead_kb`, String(Math.floor(bytes / 1024)));
    } catch {
      // keep the default
    }
  }

  /** Asks the kernel to unmount; with `lazy`, detaches at once and lets open files finish. */
  async unmount(lazy = false): Promise<{ ok: boolean; message: string }> {
    const r = await run('umount', lazy ? ['-l', this.mountpoint] : [this.mountpoint], []);
    return { ok: r.code === 0, message: r.stderr.trim().replace(/\s+/g, ' ') };
  }

  /**
   * True while the reader thread may be blocked in read(2): the connection has not ended (a lazily detached
   * mount with files still open). Node cannot exit then (it joins its threads at exit), so the caller
   * must end the process with a signal instead (the kernel then aborts the connection).
   */
  get readerBlocked(): boolean {
    return this.worker !== null && !this.readerEnded;
  }

  /** Closes the device after the connection ended (the reader thread has finished). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.readerBlocked) await this.worker?.terminate();
    fs.closeSync(this.fd);
  }
}

/** Runs a program asynchronously (this process must keep answering FUSE requests meanwhile). */
function run(cmd: string, args: string[], fds: number[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe', ...fds] });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (err) => resolve({ code: 127, stderr: `${cmd}: ${err.message}` }));
    child.on('close', (code) => resolve({ code: code ?? 1, stderr }));
  });
}

/**
 * Checks that `mountpoint` is a directory this process can mount on, with one clear line otherwise; a stale
 * mount of a killed blocksafe (ENOTCONN) gets the command that clears it.
 */
export function checkMountpoint(mountpoint: string): void {
  let st: fs.Stats;
  try {
    st = fs.statSync(mountpoint);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') {
      throw new RefusedError(`${mountpoint} is a stale FUSE mount (the process that served it was killed); clear it with: umount ${mountpoint}`);
    }
    if (code === 'ENOENT') throw new UsageError(`Mount point ${mountpoint} does not exist; create the directory first.`);
    throw new BlocksafeError(`Cannot use ${mountpoint} as mount point: ${(err as Error).message}.`);
  }
  if (!st.isDirectory()) throw new UsageError(`Mount point ${mountpoint} is not a directory.`);
  if (isMounted(mountpoint)) throw new RefusedError(`${mountpoint} is already a mount point; unmount it or choose another directory.`);
}

/** True when `mountpoint` (an absolute, resolved path) is listed in /proc/self/mountinfo. */
export function isMounted(mountpoint: string): boolean {
  const want = fs.realpathSync(mountpoint);
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => unescapeMountinfo(l.split(' ')[4] ?? '') === want);
}

function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
}
