import { randomBytes } from 'node:crypto';
import { lstatSync, mkdtempSync, rmdirSync, unlinkSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { BlocksafeError, UsageError } from '../errors.js';
import type { ListenAddress } from './server.js';

/** Longest Unix socket path Linux accepts (sun_path is 108 bytes with the terminating NUL). */
const MAX_SOCKET_PATH = 107;
export const DEFAULT_PORT = 10809;

/**
 * A fresh directory only the current user can enter (mode 0700, made by mkdtemp), for the default socket:
 * in $XDG_RUNTIME_DIR when that is a private directory of this user, else in $TMPDIR or /tmp.
 */
export function privateSocketDir(env: NodeJS.ProcessEnv = process.env): { dir: string; socket: string } {
  const uid = process.geteuid?.() ?? -1;
  let base = tmpdir();
  const runtime = env.XDG_RUNTIME_DIR;
  if (runtime && path.isAbsolute(runtime)) {
    try {
      const st = lstatSync(runtime);
      if (st.isDirectory() && st.uid === uid && (st.mode & 0o077) === 0) base = runtime;
    } catch {
      // not usable: fall back to the temporary directory
    }
  }
  let dir: string;
  try {
    dir = mkdtempSync(path.join(base, 'blocksafe-nbd-'));
  } catch (err) {
    throw new BlocksafeError(`Cannot create a private directory for the NBD socket in ${base} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); give one with --socket PATH.`);
  }
  const st = lstatSync(dir);
  if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) {
    throw new BlocksafeError(`The socket directory ${dir} is not private (owner ${st.uid}, mode ${(st.mode & 0o777).toString(8)}); give a socket with --socket PATH.`);
  }
  const socket = path.join(dir, 'nbd.sock');
  checkSocketPathLength(socket);
  return { dir, socket };
}

export function checkSocketPathLength(file: string): void {
  if (Buffer.byteLength(file) > MAX_SOCKET_PATH) {
    throw new UsageError(`The socket path ${file} is longer than ${MAX_SOCKET_PATH} bytes, which Unix sockets do not allow; choose a shorter --socket PATH (or TMPDIR).`);
  }
}

/** A stale socket file of a dead server is removed; a live one, or anything that is not a socket, is refused. */
export async function prepareSocketPath(file: string): Promise<void> {
  checkSocketPathLength(file);
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

export function unlinkQuiet(file: string): void {
  try {
    unlinkSync(file);
  } catch {
    // gone already
  }
}

export function rmdirQuiet(dir: string): void {
  try {
    rmdirSync(dir);
  } catch {
    // gone already, or not empty (left alone)
  }
}

/** "ADDR:PORT", "[v6]:PORT", "ADDR" (port 10809) or "PORT" (on 127.0.0.1). */
export function parseTcp(text: string, flag = '--tcp'): { host: string; port: number } {
  let host: string;
  let port = String(DEFAULT_PORT);
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
  if (!host || !/^\d+$/.test(port) || n > 65535) throw new UsageError(`Invalid ${flag} "${text}": use ADDR:PORT such as 127.0.0.1:10809 or [::1]:10809.`);
  return { host, port: n };
}

/** A per-run secret that prefixes every export name over TCP without TLS (128 random bits, URL-safe). */
export function exportSecret(): string {
  return randomBytes(16).toString('base64url');
}

export function formatAddress(a: ListenAddress): string {
  if ('path' in a) return a.path;
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

/**
 * The URI of one export as libnbd (nbdinfo, nbdcopy, nbdfuse) and qemu take it. With TLS the PSK identity
 * goes into the URI: libnbd's default identity is the login name, which is often not available (no tty).
 */
export function exportUri(a: ListenAddress, name: string, tls: { identity: string; pskFile: string } | null): string {
  const n = name.split('/').map(encodeURIComponent).join('/');
  const user = tls ? `${encodeURIComponent(tls.identity)}@` : '';
  const scheme = tls ? 'nbds' : 'nbd';
  const query: string[] = [];
  if ('path' in a) query.push(`socket=${encodeURI(a.path)}`);
  if (tls) query.push(`tls-psk-file=${encodeURI(tls.pskFile)}`);
  const q = query.length > 0 ? `?${query.join('&')}` : '';
  if ('path' in a) return `${scheme}+unix://${user}/${n}${q}`;
  return `${scheme}://${user}${formatAddress(a)}/${n}${q}`;
}
