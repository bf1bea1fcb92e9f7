import { realpathSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import type { Command } from 'commander';
import { NotFoundError, RefusedError, UsageError } from '../../errors.js';
import { validateName } from '../../engine/backup.js';
import { LockNames, type Lock } from '../../engine/locks.js';
import { checkMountpoint, FuseDevice } from '../../fuse/device.js';
import { FuseSession } from '../../fuse/session.js';
import { versionTree } from '../../fuse/versionTree.js';
import { BlockCache, cacheCapacity } from '../../nbd/blockCache.js';
import { NbdExport } from '../../nbd/export.js';
import { selectVersions } from '../../nbd/exports.js';
import { Overlay } from '../../nbd/overlay.js';
import { withPipeline, type GlobalOptions } from '../context.js';
import { checkKeepAs, keepOverlay, reportDiscarded, waitForSignal } from '../overlayServe.js';

const MiB = 2 ** 20;

interface MountOptions extends GlobalOptions {
  rw?: boolean;
  keepAs?: string;
  overlayDir?: string;
  allowOther?: boolean;
  json?: boolean;
}

export function register(program: Command): void {
  program
    .command('mount')
    .description('mount versions as files (FUSE, needs root): by_id/<id>/data is the image, by_name/<volume>/ links to them; runs until Ctrl-C')
    .argument('<mountpoint>', 'an existing empty directory')
    .argument('[version...]', 'version ids, volume names (their newest complete version) or unique id prefixes (default: every complete version)')
    .option('--rw', 'accept writes to the data files into a temporary copy-on-write overlay (the backup never changes)')
    .option('--keep-as <name>', 'with --rw and one version: on unmount store the overlaid volume as a new protected version of volume NAME')
    .option('--overlay-dir <dir>', 'directory for the overlay files (default $TMPDIR or /tmp)')
    .option('--allow-other', 'let users other than root read the mount (FUSE allow_other)')
    .option('--json', 'print the mount point and versions (and a kept version) as JSON lines')
    .action(async (mountpoint: string, refs: string[], _opts: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<MountOptions>();
      if (opts.keepAs && !opts.rw) throw new UsageError('--keep-as needs --rw (without writes there is nothing new to keep).');
      if (opts.keepAs) validateName(opts.keepAs);
      if (process.getuid?.() !== 0) {
        throw new RefusedError('blocksafe mount needs root (it mounts a FUSE file system with mount(8)); run it as root, or use "blocksafe nbd" as another user.');
      }
      checkMountpoint(path.resolve(mountpoint));
      // As /proc/self/mountinfo will name it (symlinks resolved).
      const where = realpathSync(path.resolve(mountpoint));
      await withPipeline(opts, (repo, pipeline, s) => serve(repo, pipeline, s.queueDepth, where, refs, opts));
    });
}

type Repo = Parameters<Parameters<typeof withPipeline>[1]>[0];
type Pipeline = Parameters<Parameters<typeof withPipeline>[1]>[1];

async function serve(repo: Repo, pipeline: Pipeline, queueDepth: number, mountpoint: string, refs: string[], opts: MountOptions): Promise<void> {
  const versions = selectVersions(repo, refs);
  checkKeepAs(versions, opts.keepAs, 'mount');
  const log = (m: string) => process.stderr.write(`blocksafe mount: ${m}\n`);
  const locks: Lock[] = [];
  const overlays: Overlay[] = [];
  const exports: NbdExport[] = [];
  let dev: FuseDevice | null = null;
  let ended: Promise<string> | null = null;
  let signals = waitForSignal();
  const hurry = () => {
    // A third Ctrl-C: leave at once (the kernel ends the mount's connection when this process dies).
    for (const o of overlays) o.removeSync();
    process.stderr.write('blocksafe: interrupted; stopped without finishing.\n');
    exitNow(dev, 130);
  };
  try {
    for (const v of versions) locks.push(await repo.locks.acquire(LockNames.version(v.id), 'shared', `Version ${v.id}`));
    for (const v of versions) if (!repo.index.hasVersion(v.id)) throw new NotFoundError(`Version ${v.id} was removed meanwhile; nothing is mounted.`);

    const cache = new BlockCache(pipeline, cacheCapacity(repo.blockSize));
    const overlayDir = path.resolve(opts.overlayDir ?? tmpdir());
    for (const v of versions) {
      let overlay: Overlay | null = null;
      if (opts.rw) {
        overlay = await Overlay.create(overlayDir, v.id, v.size);
        overlays.push(overlay);
      }
      exports.push(new NbdExport(v, repo, cache, overlay));
    }
    const tree = versionTree(exports);
    dev = await FuseDevice.mount(mountpoint, { readOnly: !opts.rw, allowOther: !!opts.allowOther, fsname: 'blocksafe' });
    const session = new FuseSession(dev, tree, log);
    ended = session.serve();
    // After INIT, which sets the read-ahead to at most what the kernel offered (128 KiB).
    await Promise.race([session.initialized, ended]);
    dev.setReadahead(Math.min(16 * MiB, Math.max(MiB, 2 * repo.blockSize)));
    announce(mountpoint, exports, opts);
    if (opts.allowOther) log('--allow-other: every local user can read the decrypted versions under this mount point.');

    // Stop on Ctrl-C/SIGTERM (unmount), or when someone else unmounts (the connection ends).
    const first = await Promise.race([signals, ended.then(() => null)]);
    if (first !== null) {
      signals = waitForSignal();
      if (!opts.json) process.stderr.write(`\nblocksafe mount: ${first}: unmounting ${mountpoint}…\n`);
      let u = await dev.unmount();
      while (!u.ok) {
        // Busy: a file is open or the data file is loop-mounted. Keep serving; the next signal detaches lazily.
        log(`cannot unmount yet (${u.message}); close the files in it (and detach loop devices), then press Ctrl-C again to detach it lazily.`);
        const next = await Promise.race([signals, ended.then(() => null)]);
        if (next === null) break;
        signals = waitForSignal();
        u = await dev.unmount();
        if (!u.ok) {
          u = await dev.unmount(true);
          if (u.ok) log('detached; serving the files still open until they are closed.');
        }
      }
    }
    // From here a signal means "leave now" (also while --keep-as stores the overlay).
    signals.cancel();
    process.on('SIGINT', hurry);
    process.on('SIGTERM', hurry);
    await ended;
    await dev.close();
    dev = null;

    if (opts.keepAs) await keepOverlay(repo, pipeline, exports[0]!, { keepAs: opts.keepAs, queueDepth, json: !!opts.json });
    else if (opts.rw && !opts.json) reportDiscarded(exports);
    if (opts.json) process.stdout.write(JSON.stringify({ event: 'unmounted', mountpoint, signal: first }) + '\n');
    else if (!opts.rw) process.stderr.write(`Unmounted ${mountpoint}.\n`);
  } finally {
    let blocked = false;
    if (dev) {
      // An error after mounting: detach so the reader ends and nothing is left behind.
      await dev.unmount(true);
      await Promise.race([ended, new Promise((r) => setTimeout(r, 5000).unref())]);
      blocked = dev.readerBlocked;
      await dev.close();
    }
    for (const o of overlays) await o.remove();
    for (const l of locks) await l.release().catch(() => undefined);
    if (blocked) {
      log(`files in ${mountpoint} are still open; ending the process so that the kernel drops the mount (their reads fail from now on).`);
      exitNow(dev, 1);
    }
    signals.cancel();
    process.off('SIGINT', hurry);
    process.off('SIGTERM', hurry);
  }
}

/**
 * Leaves the process at once. While the FUSE reader thread is blocked in read(2) Node cannot exit (it
 * joins its threads), so then the process ends itself with SIGKILL; the kernel aborts the connection.
 */
function exitNow(dev: FuseDevice | null, code: number): never {
  if (dev?.readerBlocked) process.kill(process.pid, 'SIGKILL');
  process.exit(code);
}

function announce(mountpoint: string, exports: readonly NbdExport[], opts: MountOptions): void {
  if (opts.json) {
    const line = {
      event: 'mounted',
      mountpoint,
      read_only: !opts.rw,
      versions: exports.map((e) => ({ id: e.version.id, volume: e.version.name, size: e.version.size, data: path.join(mountpoint, 'by_id', e.version.id, 'data') })),
    };
    process.stdout.write(JSON.stringify(line) + '\n');
    return;
  }
  const n = exports.length;
  const lines = [
    `Mounted ${n} version${n === 1 ? '' : 's'} on ${mountpoint} ${opts.rw ? 'read-write (writes go to a temporary overlay; the backup never changes)' : 'read-only'}:`,
    ...exports.map((e) => `  ${path.join(mountpoint, 'by_id', e.version.id, 'data')}  (${e.version.name})`),
    `Loop-mount a data file with: mount -o loop,ro FILE DIR. Stop with Ctrl-C (or umount ${mountpoint}).` +
      (opts.keepAs ? ` On exit the overlay is kept as a new protected version of "${opts.keepAs}".` : opts.rw ? ' On exit the overlay is discarded.' : ''),
  ];
  process.stdout.write(lines.join('\n') + '\n');
}
