/**
 * `blocksafe mount` as a child process, for the UI's Mount action (docs/MOUNT.md "For the TUI"). The mount
 * runs in a process of its own: a process that serves a FUSE mount must never read it itself (it would wait
 * on itself), and the child unmounts cleanly on SIGINT whatever the UI does meanwhile.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rmdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { MountFailedError, type MountedVersion } from './backend.js';

/**
 * How to run this blocksafe again: in the single executable process.execPath is blocksafe itself; under
 * Node it is node, and the script (bin/blocksafe.js) is process.argv[1] (which the single executable sets to
 * process.execPath).
 */
export function selfCommand(): { file: string; args: string[] } {
  const script = process.argv[1];
  if (script && script !== process.execPath && /\.[cm]?js$/.test(script)) return { file: process.execPath, args: [script] };
  return { file: process.execPath, args: [] };
}

/** Mounts still served by a child: told to unmount if the UI process ends without doing so itself. */
const live = new Set<() => void>();
let exitHook = false;

/** The child's one-line message without its "blocksafe: " prefix. */
function message(line: string): string {
  return line.replace(/^blocksafe( mount)?: /, '');
}

/**
 * Mounts version `id` read-only on a new private directory (mkdtemp: mode 0700). `repoArgs` are the
 * repository options (never a secret: a passphrase goes in `env` as BLOCKSAFE_PASSPHRASE). Rejects with the
 * child's own error line when it ends before mounting (not root, no /dev/fuse, a locked version).
 */
export async function mountInChild(id: string, repoArgs: string[], env: NodeJS.ProcessEnv): Promise<MountedVersion> {
  const dir = await mkdtemp(path.join(tmpdir(), 'blocksafe-mount-'));
  const self = selfCommand();
  // Its own process group: a terminal's signals (SIGHUP of a closed window) go to the UI, which unmounts.
  const child = spawn(self.file, [...self.args, 'mount', '--json', ...repoArgs, dir, id], { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const stderr: string[] = [];
  const stderrWaiters = new Set<(line: string) => void>();
  createInterface({ input: child.stderr }).on('line', (line) => {
    stderr.push(line);
    for (const w of stderrWaiters) w(line);
  });
  const exited = new Promise<{ code: number | null; error?: Error }>((resolve) => {
    child.once('error', (error) => resolve({ code: null, error }));
    child.once('close', (code) => resolve({ code }));
  });
  const stop = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT');
  };
  live.add(stop);
  if (!exitHook) {
    exitHook = true;
    process.on('exit', () => {
      for (const s of live) s();
    });
  }
  const failure = (code: number | null, error?: Error) =>
    new MountFailedError(error ? `blocksafe mount could not be started: ${error.message}` : message(stderr.at(-1) ?? `blocksafe mount ended with exit code ${code} before mounting.`));

  const mountedLine = new Promise<string | null>((resolve) => {
    const lines = createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      if (line.startsWith('{') && line.includes('"mounted"')) resolve(line);
    });
    lines.on('close', () => resolve(null));
  });
  const first = await Promise.race([mountedLine, exited.then(() => null)]);
  if (first === null) {
    const r = await exited;
    live.delete(stop);
    await rmdir(dir).catch(() => undefined);
    throw failure(r.code, r.error);
  }
  let data = path.join(dir, 'by_id', id, 'data');
  try {
    const event = JSON.parse(first) as { versions?: { data?: string }[] };
    data = event.versions?.[0]?.data ?? data;
  } catch {
    // the default path is the same
  }
  const ended = exited.then(async (r) => {
    live.delete(stop);
    await rmdir(dir).catch(() => undefined);
    return r.code === 0 ? null : failure(r.code, r.error).message;
  });
  return {
    dir,
    data,
    ended,
    unmount: async () => {
      // Busy (a file open, the data file loop-mounted): the child says so and keeps serving; asked again, it
      // detaches lazily.
      let onLine: ((line: string) => void) | undefined;
      const busy = new Promise<string>((resolve) => {
        onLine = (line) => {
          if (/cannot unmount yet/.test(line)) resolve(line);
        };
        stderrWaiters.add(onLine);
      });
      stop();
      try {
        const r = await Promise.race([ended, busy.then((line) => ({ busy: line }))]);
        if (r !== null && typeof r === 'object') throw new MountFailedError(message(r.busy));
        if (r !== null) throw new MountFailedError(r);
      } finally {
        stderrWaiters.delete(onLine!);
      }
    },
  };
}
