import { readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import { BlocksafeError, describeSystemError, NotFoundError, UsageError } from '../errors.js';

/** What a source or target path is, with its size as the kernel reports it. */
export interface DeviceInfo {
  path: string;
  kind: 'file' | 'block';
  size: number;
}

/** Strips a file:// scheme; rejects schemes this build cannot read. */
export function sourcePath(uri: string): string {
  if (uri.startsWith('file://')) return decodeURIComponent(new URL(uri).pathname);
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(uri);
  if (scheme) throw new UsageError(`Unsupported source scheme "${scheme[1]}://" in ${uri}; use a path or file:// URI.`);
  return uri;
}

/** "major:minor" of a device number as stat reports it (Linux's encoding). */
export function devNumber(rdev: number): string {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((Math.floor(rdev / 2 ** 20) & 0xfff) << 8);
  return `${major}:${minor}`;
}

/** Size of a block device from sysfs (stat reports 0 for devices). */
export function blockDeviceSize(rdev: number): number {
  const devno = devNumber(rdev);
  try {
    const sectors = Number(readFileSync(`/sys/dev/block/${devno}/size`, 'utf8').trim());
    return sectors * 512;
  } catch (err) {
    throw new BlocksafeError(`Cannot read the size of block device ${devno} from /sys (${(err as Error).message}).`);
  }
}

/** Describes an existing source: a regular file or a block device. */
export async function inspectSource(path: string): Promise<DeviceInfo> {
  let st;
  try {
    st = await fs.stat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new NotFoundError(`Source ${path} does not exist.`);
    throw describeSystemError(err, `Source ${path}`);
  }
  if (st.isFile()) return { path, kind: 'file', size: st.size };
  if (st.isBlockDevice()) return { path, kind: 'block', size: blockDeviceSize(st.rdev) };
  if (st.isDirectory()) throw new UsageError(`Source ${path} is a directory; blocksafe backs up files and block devices (images, disks, LVM volumes).`);
  throw new UsageError(`Source ${path} is neither a regular file nor a block device.`);
}

/** Mount points of a block device (by its device number, so /dev/loop0 and its aliases match). */
export function mountsOf(rdev: number): string[] {
  const devno = devNumber(rdev);
  let text: string;
  try {
    text = readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f[2] === devno) out.push(f[4]!);
  }
  return out;
}

/** Reads exactly `length` bytes at `position` (short only at end of file). */
export async function readFully(fh: fs.FileHandle, buf: Buffer, length: number, position: number): Promise<number> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/** Writes all of `buf` at `position`. */
export async function writeFully(fh: fs.FileHandle, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}
