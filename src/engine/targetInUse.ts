/**
 * Is a restore target in use? Writing under a live filesystem, a loop device, LVM/RAID/dm-crypt, swap or a
 * running VM destroys data that is in use right now, so a restore refuses such a target, with or without
 * --force. What is checked is what the kernel publishes: /sys/block (loop backing files, holders,
 * partitions), /proc/self/mountinfo, /proc/swaps and /proc/<pid>/fd + fdinfo (files and devices open for
 * writing by other processes, as far as this user can see them). Files are compared by device and inode,
 * never by path string, so hard links, bind mounts and symlinks cannot hide a user.
 */
import type { Stats } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { RefusedError } from '../errors.js';
import { deviceNumber } from './device.js';

/** Where the kernel's views live (a test can point them at a fake tree). */
export interface SystemRoots {
  sys: string;
  proc: string;
}

const SYSTEM: SystemRoots = { sys: '/sys', proc: '/proc' };

async function read(file: string): Promise<string> {
  try {
    return (await fs.readFile(file, 'utf8')).trim();
  } catch {
    return '';
  }
}

async function list(dir: string): Promise<string[]> {
  try {
    return await fs.readdir(dir);
  } catch {
    return [];
  }
}

/** mountinfo and /proc/swaps escape space, tab, newline and backslash as octal. */
function unescapeOctal(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Mount points by "major:minor". */
async function mountsByDevice(roots: SystemRoots): Promise<Map<string, string[]>> {
  const out = new Map<string, string[]>();
  for (const line of (await read(path.join(roots.proc, 'self', 'mountinfo'))).split('\n')) {
    const f = line.split(' ');
    if (f.length < 5 || !f[2]) continue;
    const list = out.get(f[2]) ?? [];
    list.push(unescapeOctal(f[4]!));
    out.set(f[2], list);
  }
  return out;
}

interface Identity {
  /** "major:minor" for a block device, "dev:ino" for a file. */
  key: string;
  block: boolean;
}

function identity(st: Stats): Identity {
  return st.isBlockDevice() ? { key: deviceNumber(st.rdev), block: true } : { key: `${st.dev}:${st.ino}`, block: false };
}

async function identityOf(file: string): Promise<Identity | null> {
  try {
    return identity(await fs.stat(file));
  } catch {
    return null;
  }
}

/** Identities of the active swap areas (partitions, devices and swap files). */
async function swapIdentities(roots: SystemRoots): Promise<Set<string>> {
  const out = new Set<string>();
  for (const line of (await read(path.join(roots.proc, 'swaps'))).split('\n').slice(1)) {
    const name = line.split(/\s+/)[0];
    if (!name) continue;
    const id = await identityOf(unescapeOctal(name));
    if (id) out.add(id.key);
  }
  return out;
}

/** The sysfs directory of a block device, and its kernel name (sda1, dm-0, loop3). */
async function sysDevice(roots: SystemRoots, devno: string): Promise<{ dir: string; name: string } | null> {
  try {
    const dir = await fs.realpath(path.join(roots.sys, 'dev', 'block', devno));
    return { dir, name: path.basename(dir) };
  } catch {
    return null;
  }
}

/** "dm-0 (vg0-root)": a device-mapper holder is best known by its mapper name. */
async function holderName(roots: SystemRoots, name: string): Promise<string> {
  const dm = await read(path.join(roots.sys, 'class', 'block', name, 'dm', 'name'));
  return dm ? `${name} (/dev/mapper/${dm})` : `/dev/${name}`;
}

/** What uses one block device itself: mounts, holders (LVM, RAID, dm-crypt, bcache), swap. */
async function deviceUsers(roots: SystemRoots, dir: string, devno: string, mounts: Map<string, string[]>, swaps: Set<string>): Promise<string[]> {
  const out: string[] = [];
  const mp = mounts.get(devno);
  if (mp?.length) out.push(`mounted on ${mp.join(', ')}`);
  const holders = await list(path.join(dir, 'holders'));
  if (holders.length) out.push(`held by ${(await Promise.all(holders.map((h) => holderName(roots, h)))).join(', ')} (LVM, RAID or encryption)`);
  if (swaps.has(devno)) out.push('used as swap');
  return out;
}

/** The loop device names whose backing file is the file `key` ("dev:ino"). */
async function loopsBackedBy(roots: SystemRoots, key: string): Promise<{ name: string; devno: string }[]> {
  const out: { name: string; devno: string }[] = [];
  const block = path.join(roots.sys, 'block');
  for (const name of await list(block)) {
    if (!name.startsWith('loop')) continue;
    const backing = await read(path.join(block, name, 'loop', 'backing_file'));
    if (!backing) continue;
    // A backing file deleted since is shown with this suffix; a file with that name may still exist.
    const candidates = backing.endsWith(' (deleted)') ? [backing, backing.slice(0, -' (deleted)'.length)] : [backing];
    for (const c of candidates) {
      if ((await identityOf(c))?.key === key) {
        out.push({ name, devno: await read(path.join(block, name, 'dev')) });
        break;
      }
    }
  }
  return out;
}

const O_ACCMODE = 3;

/** Other processes (not this one) that hold `id` open for writing: "process 123 (qemu-system-x86)". */
async function writers(roots: SystemRoots, id: Identity): Promise<string[]> {
  const out: string[] = [];
  for (const pid of await list(roots.proc)) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const fdDir = path.join(roots.proc, pid, 'fd');
    for (const fd of await list(fdDir)) {
      const other = await identityOf(path.join(fdDir, fd));
      if (!other || other.block !== id.block || other.key !== id.key) continue;
      const flags = /^flags:\s*([0-7]+)/m.exec(await read(path.join(roots.proc, pid, 'fdinfo', fd)));
      if (!flags || (parseInt(flags[1]!, 8) & O_ACCMODE) === 0) continue;
      const comm = await read(path.join(roots.proc, pid, 'comm'));
      out.push(`process ${pid}${comm ? ` (${comm})` : ''}`);
      break;
    }
  }
  return out;
}

/**
 * Why the file or block device `st` (of `target`) must not be written to right now; empty when nothing is
 * seen using it. Each reason names the user: a mount point, a loop device, a holder, a process.
 */
export async function targetUsers(st: Stats, roots: SystemRoots = SYSTEM): Promise<string[]> {
  const id = identity(st);
  const mounts = await mountsByDevice(roots);
  const swaps = await swapIdentities(roots);
  const out: string[] = [];
  if (id.block) {
    const me = await sysDevice(roots, id.key);
    if (me) {
      out.push(...(await deviceUsers(roots, me.dir, id.key, mounts, swaps)));
      // A disk: writing it overwrites every partition on it.
      for (const child of await list(me.dir)) {
        const childDir = path.join(me.dir, child);
        if (!(await read(path.join(childDir, 'partition')))) continue;
        const uses = await deviceUsers(roots, childDir, await read(path.join(childDir, 'dev')), mounts, swaps);
        if (uses.length) out.push(`its partition ${child} is ${uses.join(' and ')}`);
      }
      // A partition: a disk in use as a whole (held, mounted without a partition table) owns it too.
      if (await read(path.join(me.dir, 'partition'))) {
        const parentDir = path.dirname(me.dir);
        const uses = await deviceUsers(roots, parentDir, await read(path.join(parentDir, 'dev')), mounts, swaps);
        if (uses.length) out.push(`its disk ${path.basename(parentDir)} is ${uses.join(' and ')}`);
      }
    } else {
      const mp = mounts.get(id.key);
      if (mp?.length) out.push(`mounted on ${mp.join(', ')}`);
      if (swaps.has(id.key)) out.push('used as swap');
    }
  } else {
    for (const loop of await loopsBackedBy(roots, id.key)) {
      const dir = path.join(roots.sys, 'block', loop.name);
      const uses = await deviceUsers(roots, dir, loop.devno, mounts, swaps);
      out.push(`it backs loop device /dev/${loop.name}${uses.length ? ` (${uses.join(', ')})` : ''}`);
    }
    if (swaps.has(id.key)) out.push('it is an active swap file');
  }
  const w = await writers(roots, id);
  if (w.length) out.push(`open for writing by ${w.join(', ')}`);
  return out;
}

/** Refuses (before anything is written) a target that something is using; see targetUsers. */
export async function assertTargetNotInUse(target: string, st: Stats, roots: SystemRoots = SYSTEM): Promise<void> {
  const users = await targetUsers(st, roots);
  if (users.length === 0) return;
  throw new RefusedError(`Target ${target} is in use: ${users.join('; ')}. Nothing was written; stop that use first (unmount, detach, swapoff, close the program).`);
}
