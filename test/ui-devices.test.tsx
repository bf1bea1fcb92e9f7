/**
 * ui/devices.ts reads block devices the way lsblk does. Here it reads a small fake /sys and /proc tree built
 * in a temporary directory (disks, partitions, a loop and a device-mapper device; one mounted partition, one
 * swap, one held by device-mapper), plus the real /sys of this machine as a smoke test.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test from 'ava';
import { deviceRefusal, listBlockDevices } from '../ui/devices.js';
import { tempDir } from './helpers.js';

const GiB = 2 ** 30;

async function put(root: string, file: string, content: string): Promise<void> {
  const p = path.join(root, file);
  await fs.mkdir(path.dirname(p), { recursive: true });
  await fs.writeFile(p, content + '\n');
}

async function fakeSystem(root: string): Promise<{ sys: string; mountinfo: string; swaps: string; dev: string }> {
  const sys = path.join(root, 'sys');
  const disk = async (name: string, devno: string, sectors: number, extra: Record<string, string> = {}) => {
    await put(sys, `block/${name}/dev`, devno);
    await put(sys, `block/${name}/size`, String(sectors));
    await put(sys, `block/${name}/ro`, '0');
    await put(sys, `block/${name}/removable`, '0');
    await fs.mkdir(path.join(sys, `block/${name}/holders`), { recursive: true });
    for (const [f, c] of Object.entries(extra)) await put(sys, `block/${name}/${f}`, c);
  };
  // sda: system disk with a mounted partition and a swap partition.
  await disk('sda', '8:0', (500 * GiB) / 512, { 'device/vendor': 'ATA', 'device/model': 'System SSD' });
  await disk('sda/sda1', '8:1', (1 * GiB) / 512, { partition: '1' });
  await disk('sda/sda2', '8:2', (4 * GiB) / 512, { partition: '2' });
  // sdb: a free disk with a virtio-style PCI id as vendor (not shown) and a partition held by dm-0.
  await disk('sdb', '8:16', (256 * GiB) / 512, { 'device/vendor': '0x1af4', 'device/model': 'Backup Target' });
  await disk('sdb/sdb1', '8:17', (256 * GiB) / 512, { partition: '1', 'holders/dm-0': '' });
  await disk('dm-0', '253:0', (100 * GiB) / 512, { 'dm/name': 'vg0-restore' });
  await disk('loop0', '7:0', 0); // no backing file: left out
  await disk('loop1', '7:1', (8 * GiB) / 512, { 'loop/backing_file': '/srv/images/vm.img' });
  await disk('sr0', '11:0', 0, { hidden: '0' });
  const mountinfo = path.join(root, 'mountinfo');
  await fs.writeFile(
    mountinfo,
    ['22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw', '23 22 0:5 / /proc rw - proc proc rw', '24 22 253:0 / /mnt/with\\040space rw - xfs /dev/mapper/vg0-restore rw'].join('\n') + '\n',
  );
  const swaps = path.join(root, 'swaps');
  await fs.writeFile(swaps, 'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/sda2                               partition\t4194300\t\t0\t\t-2\n');
  return { sys, mountinfo, swaps, dev: '/dev' };
}

test('lists disks, partitions, loop and device-mapper devices with size, model and what holds them', async (t) => {
  const dir = await tempDir(t, 'blocksafe-devices-');
  const devices = listBlockDevices(await fakeSystem(dir));
  const by = Object.fromEntries(devices.map((d) => [d.name, d]));
  t.deepEqual(
    devices.map((d) => d.name),
    ['dm-0', 'loop1', 'sda', 'sda1', 'sda2', 'sdb', 'sdb1'],
  );
  t.is(by.sda!.model, 'ATA System SSD');
  t.is(by.sda!.size, 500 * GiB);
  t.deepEqual(by.sda1!.mountpoints, ['/']);
  t.is(by.sda1!.parent, 'sda');
  t.deepEqual(by.sda2!.busy, ['used as swap']);
  t.deepEqual(by.sda!.busy, ['partition sda1 is mounted on /', 'partition sda2 is used as swap']);
  t.is(by.sdb!.model, 'Backup Target');
  t.regex(by.sdb1!.busy[0]!, /in use by dm-0/);
  t.is(by['dm-0']!.path, '/dev/mapper/vg0-restore');
  t.deepEqual(by['dm-0']!.mountpoints, ['/mnt/with space']);
  t.is(by.loop1!.model, 'loop of /srv/images/vm.img');

  t.is(deviceRefusal(by.sda1!, GiB), 'mounted on /');
  t.is(deviceRefusal(by.sda!, GiB), 'partition sda1 is mounted on /');
  t.is(deviceRefusal(by.sda2!, GiB), 'used as swap');
  t.regex(deviceRefusal(by.sdb!, GiB)!, /partition sdb1 is in use by dm-0/);
  t.is(deviceRefusal(by.loop1!, 20 * GiB), 'too small (8.00 GiB < 20.0 GiB)');
  t.is(deviceRefusal(by.loop1!, 8 * GiB), null);
});

test('reads this machine without failing', (t) => {
  let devices: ReturnType<typeof listBlockDevices> = [];
  t.notThrows(() => {
    devices = listBlockDevices();
  });
  for (const d of devices) {
    t.true(d.size > 0);
    t.true(d.path.startsWith('/dev/'));
  }
});
