/**
 * Block devices of this machine for the restore wizard, read the way lsblk does: /sys/block (disks,
 * partitions, loop and device-mapper devices, sizes, models, holders), /proc/self/mountinfo (what is
 * mounted) and /proc/swaps. Reading only; the engine checks the chosen target again before writing.
 */
import { readdirSync, readFileSync, realpathSync } from 'node:fs';
import * as path from 'node:path';
import { formatBytes } from '../src/util/size.js';

export interface BlockDevice {
  /** Kernel name: sda, sda1, nvme0n1p2, loop0, dm-0. */
  name: string;
  /** Path to open: /dev/sda, or /dev/mapper/vg0-root for device-mapper devices. */
  path: string;
  /** "major:minor". */
  devno: string;
  size: number;
  kind: 'disk' | 'partition' | 'loop' | 'lvm' | 'other';
  /** Vendor and model, loop backing file, or device-mapper name. */
  model: string;
  /** Parent disk of a partition. */
  parent: string | null;
  removable: boolean;
  readOnly: boolean;
  /** Where this device itself is mounted. */
  mountpoints: string[];
  /** Why the device is busy besides its own mounts (swap, holders, mounted partitions), empty when free. */
  busy: string[];
}

export interface SystemPaths {
  sys: string;
  mountinfo: string;
  swaps: string;
  dev: string;
}

const SYSTEM: SystemPaths = { sys: '/sys', mountinfo: '/proc/self/mountinfo', swaps: '/proc/swaps', dev: '/dev' };

function read(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim();
  } catch {
    return '';
  }
}

function list(dir: string): string[] {
  try {
    return readdirSync(dir).sort(naturalCompare);
  } catch {
    return [];
  }
}

/** sda2 < sda10. */
function naturalCompare(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

interface MountEntry {
  devno: string;
  mountpoint: string;
  source: string;
}

function readMounts(file: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of read(file).split('\n')) {
    const f = line.split(' ');
    const dash = f.indexOf('-');
    if (f.length < 5 || dash < 0) continue;
    out.push({ devno: f[2]!, mountpoint: unescapeMount(f[4]!), source: unescapeMount(f[dash + 2] ?? '') });
  }
  return out;
}

/** Kernel names (sda2, dm-1) of the swap devices. */
function readSwaps(file: string, dev: string): Set<string> {
  const out = new Set<string>();
  for (const line of read(file).split('\n').slice(1)) {
    const name = line.split(/\s+/)[0];
    if (!name || !name.startsWith('/')) continue;
    out.add(kernelName(name, dev));
  }
  return out;
}

/** /dev/mapper/vg-root → dm-0 (when the symlink resolves), /dev/sda1 → sda1. */
function kernelName(devPath: string, dev: string): string {
  let p = devPath;
  try {
    p = realpathSync(devPath);
  } catch {
    // not on this system (tests) or gone: use the name as written
  }
  return p.startsWith(dev + '/') ? p.slice(dev.length + 1) : path.basename(p);
}

function describeModel(sysDir: string, name: string): { kind: BlockDevice['kind']; model: string; devPath?: string } {
  if (name.startsWith('loop')) {
    const backing = read(path.join(sysDir, 'loop', 'backing_file'));
    return { kind: 'loop', model: backing ? `loop of ${backing}` : 'loop device' };
  }
  const dmName = read(path.join(sysDir, 'dm', 'name'));
  if (dmName) return { kind: 'lvm', model: `device-mapper ${dmName}`, devPath: `mapper/${dmName}` };
  const vendor = read(path.join(sysDir, 'device', 'vendor'));
  const model = read(path.join(sysDir, 'device', 'model'));
  // virtio and some controllers put a PCI id ("0x1af4") there: no help to a human.
  const words = [vendor, model].filter((w) => w && !/^0x[0-9a-f]+$/i.test(w));
  return { kind: 'disk', model: words.join(' ') };
}

/**
 * Every block device with a medium (size > 0), disks followed by their partitions. Devices without a medium
 * (unattached loop devices, empty card readers) are left out: nothing can be restored to them.
 */
export function listBlockDevices(paths: Partial<SystemPaths> = {}): BlockDevice[] {
  const p: SystemPaths = { ...SYSTEM, ...paths };
  const mounts = readMounts(p.mountinfo);
  const swaps = readSwaps(p.swaps, p.dev);
  const mountsOf = (name: string, devno: string, devPath: string): string[] =>
    mounts.filter((m) => m.devno === devno || m.source === devPath || m.source === `${p.dev}/${name}`).map((m) => m.mountpoint);

  const build = (sysDir: string, name: string, parent: string | null): BlockDevice => {
    const devno = read(path.join(sysDir, 'dev'));
    const size = Number(read(path.join(sysDir, 'size')) || 0) * 512;
    const info = parent ? { kind: 'partition' as const, model: '' } : describeModel(sysDir, name);
    const devPath = `${p.dev}/${'devPath' in info && info.devPath ? info.devPath : name}`;
    const busy: string[] = [];
    if (swaps.has(name)) busy.push('used as swap');
    const holders = list(path.join(sysDir, 'holders'));
    if (holders.length) busy.push(`in use by ${holders.join(', ')} (LVM, RAID or encryption)`);
    return {
      name,
      path: devPath,
      devno,
      size,
      kind: info.kind,
      model: info.model,
      parent,
      removable: read(path.join(sysDir, 'removable')) === '1',
      readOnly: read(path.join(sysDir, 'ro')) === '1',
      mountpoints: mountsOf(name, devno, devPath),
      busy,
    };
  };

  const out: BlockDevice[] = [];
  for (const name of list(path.join(p.sys, 'block'))) {
    const sysDir = path.join(p.sys, 'block', name);
    if (read(path.join(sysDir, 'hidden')) === '1') continue;
    const disk = build(sysDir, name, null);
    const parts = list(sysDir)
      .filter((child) => read(path.join(sysDir, child, 'partition')) !== '')
      .map((child) => build(path.join(sysDir, child), child, name));
    for (const part of parts) {
      if (part.mountpoints.length) disk.busy.push(`partition ${part.name} is mounted on ${part.mountpoints.join(', ')}`);
      else if (part.busy.length) disk.busy.push(`partition ${part.name} is ${part.busy.join(', ')}`);
      if (!part.model) part.model = `partition of ${name}`;
    }
    if (disk.size === 0) continue;
    out.push(disk, ...parts.filter((x) => x.size > 0));
  }
  return out;
}

/** Why `d` cannot receive a restore of `needed` bytes, or null when it can (it will still be overwritten). */
export function deviceRefusal(d: BlockDevice, needed: number): string | null {
  if (d.mountpoints.length) return `mounted on ${d.mountpoints.join(', ')}`;
  if (d.busy.length) return d.busy[0]!;
  if (d.readOnly) return 'read-only';
  if (d.size < needed) return `too small (${formatBytes(d.size)} < ${formatBytes(needed)})`;
  return null;
}
