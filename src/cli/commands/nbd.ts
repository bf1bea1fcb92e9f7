import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Option, type Command } from 'commander';
import { BlocksafeError, NotFoundError, UsageError } from '../../errors.js';
import { validateName } from '../../engine/backup.js';
import { LockNames, type Lock } from '../../engine/locks.js';
import { BlockCache, cacheCapacity } from '../../nbd/blockCache.js';
import { exportSecret, exportUri, formatAddress, parseTcp, prepareSocketPath, privateSocketDir, rmdirQuiet, unlinkQuiet } from '../../nbd/endpoint.js';
import { NbdExport } from '../../nbd/export.js';
import { exportNames, selectVersions } from '../../nbd/exports.js';
import { Overlay } from '../../nbd/overlay.js';
import { MAX_PAYLOAD } from '../../nbd/protocol.js';
import { NbdServer, type ListenAddress, type NbdLimits } from '../../nbd/server.js';
import { loadPskFile, type PskKeys } from '../../nbd/tls.js';
import { parseDuration } from '../../util/size.js';
import { config, withPipeline, type GlobalOptions } from '../context.js';
import { checkKeepAs, keepOverlay, reportDiscarded, waitForSignal } from '../overlayServe.js';

interface NbdOptions extends GlobalOptions {
  socket?: string;
  tcp?: string;
  listen?: string;
  tlsPsk?: string;
  insecureTcp?: boolean;
  maxConnections?: string;
  handshakeTimeout?: string;
  idleTimeout?: string;
  stallTimeout?: string;
  rw?: boolean;
  keepAs?: string;
  overlayDir?: string;
  verbose?: boolean;
}

/** Where and how the server listens, decided from the options before the repository is opened. */
interface Endpoint {
  /** A Unix socket path, or a TCP address. */
  address: ListenAddress;
  /** The private directory made for the default socket (removed on exit), or null. */
  privateDir: string | null;
  psk: PskKeys | null;
  /** Prefix of every export name (TCP without TLS), or null. */
  secret: string | null;
}

export function register(program: Command): void {
  program
    .command('nbd')
    .description('serve versions over the NBD protocol (read-only; --rw with a copy-on-write overlay that never changes the backup)')
    .argument('[version...]', 'version ids, volume names (their newest complete version) or unique id prefixes (default: every complete version)')
    .option('--socket <path>', 'listen on this Unix socket (mode 0600) instead of a new one in a private directory')
    .option('--tcp <addr:port>', 'listen on TCP instead (port 10809 if omitted; 0 picks a free one); needs --tls-psk FILE or --insecure-tcp')
    .option('--tls-psk <file>', 'require TLS with the pre-shared keys of FILE (psktool format, IDENTITY:HEXKEY per line), on TCP or on the Unix socket')
    .option('--insecure-tcp', 'allow TCP without TLS: data travels in clear text; export names get a per-run secret prefix and listing is disabled')
    .option('--max-connections <n>', 'connections open at once ([nbd] max_connections, default 16)')
    .option('--handshake-timeout <duration>', 'time a client has to complete the handshake ([nbd] handshake_timeout, default 10s; 0 = no limit)')
    .option('--idle-timeout <duration>', 'disconnect clients idle this long ([nbd] idle_timeout, default 0 = never)')
    .option('--stall-timeout <duration>', 'disconnect clients stalled this long in the middle of a request ([nbd] stall_timeout, default 30s; 0 = never)')
    .option('--rw', 'accept writes into a temporary copy-on-write overlay (the backup never changes)')
    .option('--keep-as <name>', 'with --rw and one version: on exit store the overlaid volume as a new protected version of volume NAME')
    .option('--overlay-dir <dir>', 'directory for the overlay files (default $TMPDIR or /tmp)')
    .option('-v, --verbose', 'log connections')
    .option('--json', 'print the listening address and exports (and a kept version) as JSON lines')
    .addOption(hiddenListen())
    .action(async (refs: string[], _opts: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<NbdOptions>();
      if (opts.listen !== undefined) {
        throw new UsageError(`--listen was replaced by --tcp ADDR:PORT, which also needs --tls-psk FILE (or --insecure-tcp); without either, blocksafe nbd serves on a private Unix socket.`);
      }
      if (opts.tcp !== undefined && opts.socket !== undefined) throw new UsageError('Give either --tcp or --socket, not both.');
      if (opts.insecureTcp && opts.tcp === undefined) throw new UsageError('--insecure-tcp only applies with --tcp ADDR:PORT (the Unix socket is private already).');
      if (opts.insecureTcp && opts.tlsPsk !== undefined) throw new UsageError('Give either --tls-psk or --insecure-tcp, not both.');
      if (opts.tcp !== undefined && opts.tlsPsk === undefined && !opts.insecureTcp) {
        throw new UsageError(
          'TCP needs TLS: add --tls-psk FILE (a key file made with: psktool -u NAME -p FILE; clients connect with nbds://NAME@HOST:PORT/EXPORT?tls-psk-file=FILE), ' +
            'or --insecure-tcp for a trusted network (clear text; the export names get a secret prefix printed once).',
        );
      }
      if (opts.keepAs && !opts.rw) throw new UsageError('--keep-as needs --rw (without writes there is nothing new to keep).');
      if (opts.keepAs) validateName(opts.keepAs);
      const limits = nbdLimits(opts);
      const tcp = opts.tcp !== undefined ? parseTcp(opts.tcp) : null;
      const psk = opts.tlsPsk !== undefined ? loadPskFile(path.resolve(opts.tlsPsk)) : null;
      if (psk?.warning) process.stderr.write(`blocksafe nbd: warning: ${psk.warning}\n`);
      await withPipeline(opts, (repo, pipeline, s) => serve(repo, pipeline, s.queueDepth, refs, { tcp, psk }, limits, opts));
    });
}

/** Kept (hidden) only to explain the change to users of earlier versions. */
function hiddenListen(): Option {
  return new Option('--listen <addr:port>').hideHelp();
}

/** The [nbd] section of the configuration with the command-line overrides. */
function nbdLimits(opts: NbdOptions): NbdLimits {
  const c = config(opts).config.nbd;
  const duration = (flag: string, v: string | undefined, fallback: number) => (v === undefined ? fallback : parseDuration(v, `${flag} value`));
  let maxConnections = c.max_connections;
  if (opts.maxConnections !== undefined) {
    if (!/^\d+$/.test(opts.maxConnections) || Number(opts.maxConnections) < 1 || Number(opts.maxConnections) > 4096) {
      throw new UsageError(`Invalid --max-connections "${opts.maxConnections}": use a whole number from 1 to 4096.`);
    }
    maxConnections = Number(opts.maxConnections);
  }
  if (c.request_memory < MAX_PAYLOAD) throw new UsageError(`[nbd] request_memory must be at least 32M (one request of the maximum size).`);
  return {
    maxConnections,
    handshakeTimeoutMs: duration('--handshake-timeout', opts.handshakeTimeout, c.handshake_timeout),
    idleTimeoutMs: duration('--idle-timeout', opts.idleTimeout, c.idle_timeout),
    stallTimeoutMs: duration('--stall-timeout', opts.stallTimeout, c.stall_timeout),
    requestMemory: c.request_memory,
  };
}

type Repo = Parameters<Parameters<typeof withPipeline>[1]>[0];
type Pipeline = Parameters<Parameters<typeof withPipeline>[1]>[1];

async function serve(
  repo: Repo,
  pipeline: Pipeline,
  queueDepth: number,
  refs: string[],
  net: { tcp: { host: string; port: number } | null; psk: PskKeys | null },
  limits: NbdLimits,
  opts: NbdOptions,
): Promise<void> {
  const versions = selectVersions(repo, refs);
  checkKeepAs(versions, opts.keepAs, 'serve');
  const log = (m: string) => process.stderr.write(`blocksafe nbd: ${m}\n`);
  const locks: Lock[] = [];
  const overlays: Overlay[] = [];
  let socketFile: string | null = null;
  let privateDir: string | null = null;
  let server: NbdServer | null = null;
  const removeSocket = () => {
    if (socketFile) unlinkQuiet(socketFile);
    if (privateDir) rmdirQuiet(privateDir);
    socketFile = null;
    privateDir = null;
  };
  const hurry = () => {
    // A second Ctrl-C: leave at once (locks of a dead process are taken over by the next command).
    for (const o of overlays) o.removeSync();
    removeSocket();
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
    // TCP without TLS: every name gets a random prefix, the only thing standing between the network and the data.
    const secret = net.tcp && !net.psk ? exportSecret() : null;
    const names = exportNames(repo, versions).map((n) => ({ ...n, name: secret ? `${secret}/${n.name}` : n.name }));
    const defaultExport = !secret && (refs.length > 0 || versions.length === 1) ? byId.get(versions[0]!.id)! : null;
    server = new NbdServer({
      exports: names.map((n) => ({ name: n.name, description: n.description, export: byId.get(n.version.id)! })),
      defaultExport,
      tls: net.psk,
      hideList: secret !== null,
      limits,
      log,
      verbose: !!opts.verbose,
    });

    let address: ListenAddress;
    if (net.tcp) address = net.tcp;
    else if (opts.socket !== undefined) {
      address = { path: path.resolve(opts.socket) };
      await prepareSocketPath(address.path);
    } else {
      const p = privateSocketDir();
      privateDir = p.dir;
      address = { path: p.socket };
    }
    if ('path' in address) socketFile = address.path;
    let bound: ListenAddress;
    try {
      bound = await server.listen(address);
    } catch (err) {
      throw listenError(err, address);
    }
    const endpoint: Endpoint = { address: bound, privateDir, psk: net.psk, secret };
    announce(endpoint, names, !!opts.rw, limits, opts);

    const signal = await stopSignal;
    process.on('SIGINT', hurry);
    process.on('SIGTERM', hurry);
    if (!opts.json) process.stderr.write(`\nblocksafe nbd: ${signal}: stopping (finishing requests in flight)…\n`);
    await server.close();
    removeSocket();

    if (opts.keepAs) {
      await keepOverlay(repo, pipeline, byId.get(versions[0]!.id)!, { keepAs: opts.keepAs, queueDepth, json: !!opts.json });
    } else if (opts.rw && !opts.json) {
      reportDiscarded([...byId.values()]);
    }
    if (opts.json) process.stdout.write(JSON.stringify({ event: 'stopped', signal }) + '\n');
  } finally {
    if (server && !server.isStopping) await server.close(0);
    for (const o of overlays) await o.remove();
    for (const l of locks) await l.release().catch(() => undefined);
    removeSocket();
    stopSignal.cancel();
    process.off('SIGINT', hurry);
    process.off('SIGTERM', hurry);
  }
}

function tlsOf(e: Endpoint): { identity: string; pskFile: string } | null {
  // The first identity of the key file goes into the printed URIs (a client with another one edits the URI).
  return e.psk ? { identity: e.psk.keys.keys().next().value as string, pskFile: e.psk.file } : null;
}

function announce(e: Endpoint, names: ReturnType<typeof exportNames>, rw: boolean, limits: NbdLimits, opts: NbdOptions): void {
  const tls = tlsOf(e);
  const uri = (name: string) => exportUri(e.address, name, tls);
  if (opts.json) {
    const line = {
      event: 'listening',
      address: 'path' in e.address ? null : formatAddress(e.address),
      socket: 'path' in e.address ? e.address.path : null,
      tls: e.psk ? 'psk' : null,
      tls_identities: e.psk ? [...e.psk.keys.keys()] : [],
      secret_names: e.secret !== null,
      read_only: !rw,
      max_connections: limits.maxConnections,
      exports: names.map((n) => ({ name: n.name, version: n.version.id, volume: n.version.name, size: n.version.size, alias: n.alias, uri: uri(n.name) })),
    };
    process.stdout.write(JSON.stringify(line) + '\n');
    return;
  }
  const versions = names.filter((n) => !n.alias).length;
  const where = 'path' in e.address ? `Unix socket ${e.address.path} (only this user can connect)` : formatAddress(e.address);
  const how = e.psk ? `, TLS with the pre-shared keys of ${e.psk.file}` : e.secret ? ', WITHOUT TLS' : '';
  const lines = [`Serving ${versions} version${versions === 1 ? '' : 's'} ${rw ? 'read-write (writes go to a temporary overlay; the backup never changes)' : 'read-only'} on ${where}${how}:`];
  const width = Math.max(...names.map((n) => uri(n.name).length));
  for (const n of names) lines.push(`  ${uri(n.name).padEnd(width)}  ${n.description}`);
  if (e.secret) {
    lines.push(
      'The export names above carry a secret generated for this run and shown only here: anyone who has them, or can see the',
      `network traffic, can read${rw ? ' and write' : ''} the exports. Use --tls-psk FILE instead of --insecure-tcp on networks you do not trust.`,
    );
  }
  lines.push(`Stop with Ctrl-C.${opts.keepAs ? ` On exit the overlay is kept as a new protected version of "${opts.keepAs}".` : rw ? ' On exit the overlay is discarded.' : ''}`);
  process.stdout.write(lines.join('\n') + '\n');
}

function listenError(err: unknown, address: ListenAddress): Error {
  const code = (err as NodeJS.ErrnoException).code;
  const where = formatAddress(address);
  if (code === 'EADDRINUSE') return new BlocksafeError(`Cannot listen on ${where}: the address is in use (another NBD server?); choose another with --tcp ADDR:PORT.`);
  if (code === 'EACCES') return new BlocksafeError(`Cannot listen on ${where}: permission denied (ports below 1024 need root).`);
  if (code === 'EADDRNOTAVAIL') return new BlocksafeError(`Cannot listen on ${where}: no such local address.`);
  return new BlocksafeError(`Cannot listen on ${where}: ${(err as Error).message}.`);
}
