/**
 * A small FAKE data layer for the Ink component tests only (test/ui.test.tsx): versions, devices and
 * targets in memory, a restore that "writes" on a timer. It exists so the components can be driven
 * key by key without a repository; the real engine path is covered end to end by test/tui-tmux.test.ts.
 */
import { render } from 'ink-testing-library';
import type { ReactElement } from 'react';
import {
  CancelledError,
  MountFailedError,
  type Backend,
  type MountedVersion,
  type BlockDevice,
  type Progress,
  type RestoreOutcome,
  type RestoreRequest,
  type TargetInfo,
  type VersionRecord,
} from '../ui/backend.js';
import { confirmName } from '../ui/format.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

export function fakeVersion(id: string, name: string, date: string, extra: Partial<VersionRecord> = {}): VersionRecord {
  const size = extra.size ?? 20 * GiB;
  return {
    format: 1,
    id,
    name,
    snapshot_name: '',
    date,
    size,
    block_size: 4 * MiB,
    complete: true,
    valid: true,
    protected: false,
    tags: [],
    expire: null,
    blocks_done: Math.ceil(size / (4 * MiB)),
    source: `/dev/vg0/${name}-snap`,
    base: null,
    stats: {
      bytes_read: size / 2,
      bytes_written: size / 4,
      bytes_deduplicated: 0,
      bytes_sparse: size / 2,
      blocks_read: 2560,
      blocks_written: 1280,
      blocks_deduplicated: 1280,
      blocks_sparse: 2560,
      blocks_referenced: 0,
      blocks_sampled: 0,
      duration_ms: 63_000,
    },
    ...extra,
  };
}

export const VERSIONS: VersionRecord[] = [
  fakeVersion('root0003', 'root', '2026-11-27T02:00:00.000Z', { tags: ['b_daily'] }),
  fakeVersion('root0002', 'root', '2026-11-26T02:00:00.000Z', { valid: false }),
  fakeVersion('root0001', 'root', '2026-11-25T02:00:00.000Z', { protected: true, tags: ['b_weekly', 'keep'] }),
  fakeVersion('home0002', 'home', '2026-11-27T01:00:00.000Z', { complete: false, blocks_done: 100 }),
  fakeVersion('home0001', 'home', '2026-11-26T01:00:00.000Z', { size: 2 * GiB }),
];

function device(name: string, size: number, model: string, mountpoints: string[] = [], busy: string[] = []): BlockDevice {
  return { name, path: `/dev/${name}`, devno: '8:0', size, kind: 'disk', model, parent: null, removable: false, readOnly: false, mountpoints, busy };
}

export const DEVICES: BlockDevice[] = [
  device('sda', 500 * GiB, 'System SSD', ['/']),
  device('sdb', 256 * GiB, 'Samsung SSD 860'),
  device('sdc', 8 * GiB, 'USB stick'),
  device('sdd', 1024 * GiB, 'Big disk', [], ['used as swap']),
];

export interface FakeOptions {
  versions?: VersionRecord[];
  devices?: BlockDevice[];
  /** Files that "exist": path → size. */
  files?: Record<string, number>;
  /** RBD images that "exist": rbd://POOL/IMAGE → size and watchers (addresses of clients that have it open). */
  rbdImages?: Record<string, { size: number; watchers?: string[] }>;
  /** Interrupted restores: target path (or rbd:// URI) → version id and blocks done. */
  interrupted?: Record<string, { version: string; blocks_done: number }>;
  /** Milliseconds per simulated block of progress (restore runs 20 steps). */
  stepMs?: number;
  /** The restore waits at step 10 (50 %) until it is stopped: a test stops it there, whatever the machine's speed. */
  hold?: boolean;
  /** Make restore fail with this message. */
  restoreError?: string;
  damaged?: RestoreOutcome['damaged'];
  withScrub?: boolean;
  withRemove?: boolean;
  withLifecycle?: boolean;
  /** Versions the repository's minimum age keeps from being removed. */
  tooYoung?: string[];
  withMount?: boolean;
  /** Make mount fail with this message (the child's one line, e.g. "needs root"). */
  mountError?: string;
  /** The first unmount fails with this message (busy); the second succeeds. */
  unmountBusy?: string;
}

export interface FakeBackend extends Backend {
  restores: { version: string; req: RestoreRequest }[];
  removed: string[];
  /** Ids mounted, and ids unmounted, in order. */
  mounts: string[];
  unmounts: string[];
}

export function fakeBackend(o: FakeOptions = {}): FakeBackend {
  let versions = [...(o.versions ?? VERSIONS)];
  const files = o.files ?? {};
  const stepMs = o.stepMs ?? 5;
  const restores: FakeBackend['restores'] = [];
  const removed: string[] = [];
  const mounts: string[] = [];
  const unmounts: string[] = [];
  const b: FakeBackend = {
    restores,
    removed,
    mounts,
    unmounts,
    summary: { location: '/media/usb/blocksafe', encryption: 'chacha20-poly1305', blockSize: 4 * MiB },
    listVersions: () => [...versions].sort((x, y) => y.date.localeCompare(x.date)),
    versionUsage: async (v) => ({ blocks: 1000, storedBytes: v.size / 3, damagedBlocks: v.valid ? 0 : 2 }),
    listDevices: () => o.devices ?? DEVICES,
    inspectTarget: async (path: string, v: VersionRecord): Promise<TargetInfo> => {
      const abs = path.startsWith('/') || path.startsWith('rbd://') ? path : `/work/${path}`;
      const interrupted = o.interrupted?.[abs];
      const base: TargetInfo = {
        path: abs,
        name: confirmName(abs),
        kind: 'new-file',
        size: 0,
        mountpoints: [],
        refusal: null,
        overwrites: false,
        warning: null,
        interrupted: interrupted
          ? { target: abs, version: interrupted.version, blocks_done: interrupted.blocks_done, damaged: [], zeroed: true, sparse: false, started: '2026-11-27T02:30:00.000Z' }
          : null,
        description: 'a new file in /work',
      };
      if (abs.startsWith('rbd://')) {
        // As the engine backend: a new image, an existing one (typed confirmation), or one in use (refused).
        const image = o.rbdImages?.[abs];
        const rbd = { ...base, name: confirmName(abs), kind: 'new-rbd' as const, description: `a new RBD image in pool ${abs.split('/')[2]}` };
        if (!image) return rbd;
        if (image.watchers?.length) {
          return {
            ...rbd,
            kind: 'rbd',
            refusal: `RBD image ${abs.slice(6)} is in use (watched by ${image.watchers.join(', ')}: a VM or a mapping has it open); it cannot be restored to, not even with a typed confirmation. Nothing was written.`,
          };
        }
        return { ...rbd, kind: 'rbd', size: image.size, overwrites: true, description: 'an existing RBD image' };
      }
      const dev = (o.devices ?? DEVICES).find((d) => d.path === abs);
      if (dev) {
        const refusal = dev.mountpoints.length ? `mounted on ${dev.mountpoints.join(', ')}` : dev.size < v.size ? 'too small' : null;
        return {
          ...base,
          kind: 'block',
          name: dev.name,
          size: dev.size,
          overwrites: true,
          description: dev.model,
          refusal: refusal && `${abs} cannot be used: ${refusal}.`,
          contents: 'an ext4 filesystem labelled "old-root"',
        };
      }
      if (abs.endsWith('/')) return { ...base, kind: 'directory', refusal: `${abs} is a folder; add a file name.` };
      if (abs in files) return { ...base, kind: 'file', size: files[abs]!, overwrites: files[abs]! > 0, description: 'an existing file' };
      return base;
    },
    restore: (v: VersionRecord, req: RestoreRequest, onProgress: (p: Progress) => void, signal: AbortSignal) => {
      restores.push({ version: v.id, req });
      return new Promise<RestoreOutcome>((resolve, reject) => {
        let step = req.resume ? 10 : 0;
        const blocks = Math.ceil(v.size / v.block_size);
        const tick = () => {
          // Stopped: the checkpoint is the last step done, as the engine reports it.
          if (signal.aborted) return reject(new CancelledError(Math.floor((blocks * step) / 20)));
          if (o.hold && !req.resume && step === 10) return void signal.addEventListener('abort', tick, { once: true });
          if (o.restoreError && step === 5) return reject(Object.assign(new Error(o.restoreError), { exitCode: 1 }));
          step++;
          onProgress({ phase: 'restore', doneBytes: (v.size * step) / 20, totalBytes: v.size, damaged: o.damaged && step > 10 ? o.damaged.length : 0 });
          if (step >= 20) return resolve({ bytesWritten: v.size, damaged: o.damaged ?? [] });
          setTimeout(tick, stepMs);
        };
        setTimeout(tick, stepMs);
      });
    },
    close: async () => undefined,
  };
  if (o.withScrub) {
    b.scrub = async (req, onProgress) => {
      onProgress({ phase: 'scrub', doneBytes: 1, totalBytes: 1, damaged: 0 });
      return {
        blocks_selected: 10,
        blocks_checked: 10,
        bytes_checked: 40 * MiB,
        damaged: [{ checksum: 'ab'.repeat(32), reason: 'block abab… is damaged: authentication failed' }],
        invalidated_versions: req.versions.map((v) => v.id),
        invalid_versions: req.versions.map((v) => v.id),
        revalidated_versions: [],
        source_differences: [],
        blocks_due: null,
      };
    };
  }
  if (o.withRemove) {
    b.remove = async (v) => {
      if (v.protected) throw Object.assign(new Error(`Version ${v.id} is protected.`), { exitCode: 1 });
      if (o.tooYoung?.includes(v.id)) throw Object.assign(new Error(`Version ${v.id} is only 1.0 days old.`), { exitCode: 1 });
      removed.push(v.id);
      versions = versions.filter((x) => x.id !== v.id);
    };
  }
  if (o.withRemove) {
    b.removalRefusal = (v) =>
      v.protected ? `Version ${v.id} is protected.` : o.tooYoung?.includes(v.id) ? `Version ${v.id} is only 1.0 days old (minimum age for removal: 7 days). Nothing was removed.` : null;
  }
  if (o.withLifecycle) {
    const update = (id: string, fn: (v: VersionRecord) => VersionRecord) => {
      versions = versions.map((v) => (v.id === id ? fn(v) : v));
    };
    b.setProtected = async (v, on) => update(v.id, (x) => ({ ...x, protected: on }));
    b.addTag = async (v, tag) => {
      if (!/^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,63}$/.test(tag)) throw Object.assign(new Error(`Invalid tag "${tag}".`), { exitCode: 2 });
      update(v.id, (x) => ({ ...x, tags: [...new Set([...x.tags, tag])] }));
    };
    b.removeTag = async (v, tag) => update(v.id, (x) => ({ ...x, tags: x.tags.filter((t) => t !== tag) }));
  }
  if (o.withMount) {
    let busy = o.unmountBusy;
    b.mount = async (v): Promise<MountedVersion> => {
      mounts.push(v.id);
      if (o.mountError) throw new MountFailedError(o.mountError);
      const dir = `/tmp/blocksafe-mount-${v.id}`;
      let end: (why: string | null) => void = () => undefined;
      const ended = new Promise<string | null>((r) => (end = r));
      return {
        dir,
        data: `${dir}/by_id/${v.id}/data`,
        ended,
        unmount: async () => {
          unmounts.push(v.id);
          if (busy) {
            const why = busy;
            busy = undefined;
            throw new MountFailedError(why);
          }
          end(null);
        },
      };
    };
  }
  return b;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Lets the event loop run until Ink and React have handled what was written: React's scheduler and the key
 * bus (ui/hooks.ts) each advance by setImmediate, so a few hops are enough, whatever the machine's load.
 */
export async function settle(hops = 6): Promise<void> {
  for (let i = 0; i < hops; i++) await new Promise<void>((r) => setImmediate(r));
}

export type Rendered = ReturnType<typeof render>;

/** Renders at a given terminal size (ink-testing-library reports 100 columns and no rows by itself). */
export async function renderAt(tree: ReactElement, columns = 80, rows = 24): Promise<Rendered> {
  const r = render(tree);
  Object.defineProperty(r.stdout, 'columns', { value: columns, configurable: true });
  Object.defineProperty(r.stdout, 'rows', { value: rows, configurable: true });
  r.stdout.emit('resize');
  await settle();
  return r;
}

/** Polls until the last frame contains `text` (or matches it); fails with the frame after `ms` (a generous bound). */
export async function waitForFrame(r: Rendered, text: string | RegExp, ms = 20_000): Promise<string> {
  const end = Date.now() + ms;
  for (;;) {
    const frame = r.lastFrame() ?? '';
    if (typeof text === 'string' ? frame.includes(text) : text.test(frame)) return frame;
    if (Date.now() > end) throw new Error(`timed out waiting for ${String(text)}; last frame:\n${frame}`);
    await sleep(10);
  }
}

/** Types keys one event at a time, letting Ink and React handle each before the next. */
export async function press(r: Rendered, ...keys: string[]): Promise<void> {
  for (const k of keys) {
    r.stdin.write(k);
    await settle();
  }
}

/** Polls until the app has exited (Ink stops reading its input); false after a generous bound. */
export async function waitUnmounted(r: Rendered, ms = 20_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (r.stdin.listenerCount('readable') > 0 && Date.now() < end) await sleep(10);
  return r.stdin.listenerCount('readable') === 0;
}

export const KEY = {
  up: '\u001B[A',
  down: '\u001B[B',
  enter: '\r',
  esc: '\u001B',
  tab: '\t',
  backspace: '\u007F',
  ctrlC: '\u0003',
};
