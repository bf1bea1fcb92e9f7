import { connect } from 'node:net';
import { lstatSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import type { Command } from 'commander';
import { BlocksafeError, NotFoundError, UsageError } from '../../errors.js';
import { validateName } from '../../engine/backup.js';
import { LockNames, type Lock } from '../../engine/locks.js';
import { createOverlayVersion } from '../../engine/overlayVersion.js';
import { BlockCache, cacheCapacity } from '../../nbd/blockCache.js';
import { NbdExport } from '../../nbd/export.js';
import { exportNames, selectVersions } from '../../nbd/exports.js';
import { GRANULE, Overlay } from '../../nbd/overlay.js';
import { NbdServer, type ListenAddress } from '../../nbd/server.js';
import { formatBytes } from '../../util/size.js';
import { withPipeline, type GlobalOptions } from '../context.js';
import { versionJson } from '../output.js';
import { progressReporter } from '../progressLine.js';

interface NbdOptions extends GlobalOptions {
  listen?: string;
  socket?: string;
  rw?: boolean;
  keepAs?: string;
  overlayDir?: string;
  verbose?: boolean;
}

export const DEFAULT_LISTEN = '127.0.0.1:10809';

export function register(program: Command): void {
  program
    .command('nbd')
    .description('serve versions over the NBD protocol (read-only; --rw with a copy-on-write overlay that never changes the backup)')
    .argument('[version...]', 'version ids, volume names (their newest complete version) or unique id prefixes (default: every complete version)')
    .option('-l, --listen <addr:port>', `TCP address to listen on (default ${DEFAULT_LISTEN}; port 0 picks a free one)`)
    .option('--socket <path>', 'listen on a Unix socket instead of TCP')
    .option('--rw', 'accept writes into a temporary copy-on-write overlay (the backup never changes)')
    .option('--keep-as <name>', 'with --rw and one version: on exit store the overlaid volume as a new protected version of volume NAME')
    .option('--overlay-dir <dir>', 'directory for the overlay files (default $TMPDIR or /tmp)')
    .option('-v, --verbose', 'log connections')
    .option('--json', 'print the listening address and exports (and a kept version) as JSON lines')
    .action(async (refs: string[], _opts: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<NbdOptions>();
      if (opts.listen && opts.socket) throw new UsageError('Give either --listen or --socket, not both.');
      if (opts.keepAs && !opts.rw) throw new UsageError('--keep-as needs --rw (without writes there is nothing new to keep).');
      if (opts.keepAs) validateName(opts.keepAs);
      const address: ListenAddress = opts.socket ? { path: path.resolve(opts.socket) } : parseListen(opts.listen ?? DEFAULT_LISTEN);
      await withPipeline(opts, (repo, pipeline, s) => serve(repo, pipeline, s.queueDepth, refs, address, opts));
    });
}

type Repo = Parameters<Parameters<typeof withPipeline>[1]>[0];
type Pipeline = Parameters<Parameters<typeof withPipeline>[1]>[1];

async function serve(repo: Repo, pipeline: Pipeline, queueDepth: number, refs: string[], address: ListenAddress, opts: NbdOptions): Promise<void> {
  const versions = selectVersions(repo, refs);
  if (opts.keepAs && versions.length !== 1) {
    throw new UsageError(`--keep-as needs exactly one VERSION to serve (${versions.length} would be served); name the version to modify.`);
  }
  if (opts.keepAs && opts.keepAs === versions[0]!.name) {
    // Backups of a volume take its newest version as their base (and trust change hints against it).
    throw new UsageError(`--keep-as needs a volume name other than "${opts.keepAs}", so that backups of "${opts.keepAs}" do not build on the edited copy; e.g. --keep-as ${opts.keepAs}-edited.`);
  }
  const log = (m: string) => process.stderr.write(`blocksafe nbd: ${m}\n`);
  const locks: Lock[] = [];
  const overlays: Overlay[] = [];
  let socketFile: string | null = null;
  let server: NbdServer | null = null;
  const hurry = () => {
    // A second Ctrl-C: leave at once (locks of a dead process are taken over by the next command).
    for (const o of overlays) o.removeSync();
    if (socketFile) unlinkQuiet(socketFile);
    process.stderr.write('blocksafe: interrupted; stopped without finishing.\n');
    process.exit(130);
  };
  // From here on SIGINT/SIGTERM mean "stop cleanly" (a signal during start-up stops right after it).
  const stopSignal = waitForSignal();
  try {
    for (const v of versions) locks.push(await repo.locks.acquire(LockNames.version(v.id), 'shared', `Version ${v.id}`));
    for (const v of versions) if (!repo.index.hasVersion(v.id)) throw new NotFoundError(`Version ${v.id} was removed meanwhile; nothing is served.`);

    const cache = new BlockCache(pipeline, cacheCapacity(repo.blockSize));
    const overlayDir = path.resolve(opts.overlayDir ?? tmpdir());
    const byId = new Map<string, NbdExport>();
    for (const v of versions) {
      let overlay: Overlay | null = null;
      if (opts.rw) {
        overlay = await Overlay.create(overlayDir, v.id, v.size);
        overlays.push(overlay);
      }
      byId.set(v.id, new NbdExport(v, repo, cache, overlay));
    }
    const names = exportNames(repo, versions);
    const defaultExport = refs.length > 0 || versions.length === 1 ? byId.get(versions[0]!.id)! : null;
    server = new NbdServer({
      exports: names.map((n) => ({ name: n.name, description: n.description, export: byId.get(n.version.id)! })),
      defaultExport,
      log,
      verbose: !!opts.verbose,
    });

    if ('path' in address) {
      await prepareSocketPath(address.path);
      socketFile = address.path;
    }
    let bound: ListenAddress;
    try {
      bound = await server.listen(address);
    } catch (err) {
      throw listenError(err, address);
    }
    announce(bound, names, !!opts.rw, opts);

    const signal = await stopSignal;
    process.on('SIGINT', hurry);
    process.on('SIGTERM', hurry);
    if (!opts.json) process.stderr.write(`\nblocksafe nbd: ${signal}: stopping (finishing requests in flight)…\n`);
    await server.close();

    if (opts.keepAs) {
      const v = versions[0]!;
      const exp = byId.get(v.id)!;
      await exp.flush();
      const overlay = exp.overlay!;
      if (!opts.json) process.stderr.write(`Saving the overlay (${formatBytes(overlay.changedGranules() * GRANULE)} changed) as a new version of "${opts.keepAs}"…\n`);
      const progress = progressReporter(!opts.json);
      const kept = await createOverlayVersion(
        repo,
        pipeline,
        v,
        { touches: (o, l) => overlay.touches(o, l), read: (o, l) => exp.read(o, l) },
        { name: opts.keepAs, queueDepth, onProgress: progress.listener },
      );
      progress.done();
      if (opts.json) process.stdout.write(JSON.stringify({ event: 'kept', version: versionJson(kept) }) + '\n');
      else {
        process.stderr.write(
          `Kept the overlay of ${v.id} as protected version ${kept.id} of "${kept.name}": ${kept.stats.blocks_written} new blocks stored, ` +
            `${kept.stats.blocks_referenced} shared with ${v.id}.\n`,
        );
        process.stdout.write(`${kept.id}\n`);
      }
    } else if (opts.rw && !opts.json) {
      const changed = overlays.reduce((n, o) => n + o.changedGranules(), 0) * GRANULE;
      process.stderr.write(`Discarded the overlay (${formatBytes(changed)} written); the backup is unchanged.\n`);
    }
    if (opts.json) process.stdout.write(JSON.stringify({ event: 'stopped', signal }) + '\n');
  } finally {
    if (server && !server.isStopping) await server.close(0);
    for (const o of overlays) await o.remove();
    for (const l of locks) await l.release().catch(() => undefined);
    if (socketFile) unlinkQuiet(socketFile);
    stopSignal.cancel();
    process.off('SIGINT', hurry);
    process.off('SIGTERM', hurry);
  }
}

/** Resolves with the first SIGINT or SIGTERM; `cancel` removes the handlers. */
function waitForSignal(): Promise<NodeJS.Signals> & { cancel: () => void } {
  let on: (s: NodeJS.Signals) => void = () => undefined;
  const p = new Promise<NodeJS.Signals>((resolve) => {
    on = (s) => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
      resolve(s);
    };
    process.on('SIGINT', on);
    process.on('SIGTERM', on);
  });
  return Object.assign(p, {
    cancel: () => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
    },
  });
}

/** "ADDR:PORT", "[v6]:PORT", "ADDR" (port 10809) or "PORT" (on 127.0.0.1). */
export function parseListen(text: string): { host: string; port: number } {
  let host: string;
  let port = '10809';
  const v6 = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  if (v6) {
    host = v6[1]!;
    port = v6[2] ?? port;
  } else if (/^\d+$/.test(text)) {
    host = '127.0.0.1';
    port = text;
  } else {
    const i = text.lastIndexOf(':');
    if (i >= 0 && text.indexOf(':') === i) {
      host = text.slice(0, i);
      port = text.slice(i + 1);
    } else host = text;
  }
  const n = Number(port);
  if (!host || !/^\d+$/.test(port) || n > 65535) throw new UsageError(`Invalid --listen "${text}": use ADDR:PORT such as 127.0.0.1:10809 or [::1]:10809.`);
  return { host, port: n };
}

function formatAddress(a: ListenAddress): string {
  if ('path' in a) return a.path;
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

function exportUri(a: ListenAddress, name: string): string {
  const n = encodeURIComponent(name);
  if ('path' in a) return `nbd+unix:///${n}?socket=${encodeURI(a.path)}`;
  return `nbd://${formatAddress(a)}/${n}`;
}

function announce(bound: ListenAddress, names: ReturnType<typeof exportNames>, rw: boolean, opts: NbdOptions): void {
  if (opts.json) {
    const line = {
      event: 'listening',
      address: 'path' in bound ? null : formatAddress(bound),
      socket: 'path' in bound ? bound.path : null,
      read_only: !rw,
      exports: names.map((n) => ({ name: n.name, version: n.version.id, volume: n.version.name, size: n.version.size, alias: n.alias, uri: exportUri(bound, n.name) })),
    };
    process.stdout.write(JSON.stringify(line) + '\n');
    return;
  }
  const versions = names.filter((n) => !n.alias).length;
  const lines = [
    `Serving ${versions} version${versions === 1 ? '' : 's'} ${rw ? 'read-write (writes go to a temporary overlay; the backup never changes)' : 'read-only'} on ${formatAddress(bound)}:`,
  ];
  const width = Math.max(...names.map((n) => exportUri(bound, n.name).length));
  for (const n of names) lines.push(`  ${exportUri(bound, n.name).padEnd(width)}  ${n.description}`);
  lines.push(`Stop with Ctrl-C.${opts.keepAs ? ` On exit the overlay is kept as a new protected version of "${opts.keepAs}".` : rw ? ' On exit the overlay is discarded.' : ''}`);
  process.stdout.write(lines.join('\n') + '\n');
}

function unlinkQuiet(file: string): void {
  try {
    unlinkSync(file);
  } catch {
    // gone already
  }
}

/** A stale socket file of a dead server is removed; a live one, or anything that is not a socket, is refused. */
async function prepareSocketPath(file: string): Promise<void> {
  let st;
  try {
    st = lstatSync(file);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new UsageError(`${file} exists and is not a socket; choose another --socket path.`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = connect(file);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new BlocksafeError(`Another server is listening on ${file}; stop it or choose another --socket path.`);
  unlinkQuiet(file);
}

function listenError(err: unknown, address: ListenAddress): BlocksafeError {
  const code = (err as NodeJS.ErrnoException).code;
  const where = formatAddress(address);
  if (code === 'EADDRINUSE') return new BlocksafeError(`Cannot listen on ${where}: the address is in use (another NBD server?); choose another with --listen ADDR:PORT.`);
  if (code === 'EACCES') return new BlocksafeError(`Cannot listen on ${where}: permission denied (ports below 1024 need root).`);
  if (code === 'EADDRNOTAVAIL') return new BlocksafeError(`Cannot listen on ${where}: no such local address.`);
  return new BlocksafeError(`Cannot listen on ${where}: ${(err as Error).message}.`);
}
