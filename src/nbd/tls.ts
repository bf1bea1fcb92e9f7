import { readFileSync, statSync } from 'node:fs';
import type { Socket } from 'node:net';
import * as tls from 'node:tls';
import { UsageError } from '../errors.js';

/**
 * TLS with pre-shared keys for `blocksafe nbd --tls-psk FILE`, as nbdkit `--tls-psk` and qemu's
 * `tls-creds-psk` do it: the file is in GnuTLS psktool's format, one `identity:hexkey` per line
 * (`psktool -u alice -p keys.psk`), and a client proves it holds the key of its identity in the TLS
 * handshake. Nothing else (no certificates) is needed on either side.
 */
export interface PskKeys {
  file: string;
  /** identity → key */
  keys: Map<string, Buffer>;
  /** A warning about the file's permissions, or null. */
  warning: string | null;
}

/** Shortest key accepted (128 bits; psktool makes 256-bit keys by default). */
export const MIN_PSK_BYTES = 16;
/** Longest key accepted (OpenSSL's PSK_MAX_PSK_LEN is 512 bytes; psktool's maximum is 64). */
export const MAX_PSK_BYTES = 64;
/** Longest identity (OpenSSL's PSK_MAX_IDENTITY_LEN is 256; the NBD clients use a user name). */
export const MAX_IDENTITY = 128;
const MAX_FILE = 1024 * 1024;

/**
 * TLS 1.3 (forward secret with psk_dhe_ke, which GnuTLS clients offer) and, for TLS 1.2 clients, ECDHE-PSK.
 * OpenSSL's PSK server callback binds the key to SHA-256, so the TLS 1.3 suites are the SHA-256 ones; TLS 1.2
 * PSK suites are off in Node's default list, hence the explicit setting. AES-GCM first (AES-NI).
 */
export const PSK_CIPHERS = ['TLS_AES_128_GCM_SHA256', 'TLS_CHACHA20_POLY1305_SHA256', 'ECDHE-PSK-CHACHA20-POLY1305'].join(':');

/** Reads and checks a psktool key file. Errors are usage errors naming the file and line. */
export function loadPskFile(file: string): PskKeys {
  let st;
  try {
    st = statSync(file);
  } catch (err) {
    throw new UsageError(`Cannot read the TLS key file ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); create one with: psktool -u NAME -p ${file}`);
  }
  if (!st.isFile()) throw new UsageError(`The TLS key file ${file} is not a regular file.`);
  if (st.size > MAX_FILE) throw new UsageError(`The TLS key file ${file} is larger than 1 MiB; it is not a psktool key file.`);
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new UsageError(`Cannot read the TLS key file ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}).`);
  }
  const keys = new Map<string, Buffer>();
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '' || line.startsWith('#')) continue;
    const where = `${file}:${i + 1}`;
    const colon = line.indexOf(':');
    if (colon <= 0) throw new UsageError(`${where}: expected IDENTITY:HEXKEY as psktool writes it.`);
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1).trim();
    if (identity.length > MAX_IDENTITY || /[\x00-\x1f\x7f]/.test(identity)) throw new UsageError(`${where}: the identity must be at most ${MAX_IDENTITY} printable characters.`);
    if (!/^([0-9a-fA-F]{2})+$/.test(hex)) throw new UsageError(`${where}: the key is not hexadecimal.`);
    const key = Buffer.from(hex, 'hex');
    if (key.length < MIN_PSK_BYTES) throw new UsageError(`${where}: the key of "${identity}" has ${key.length * 8} bits; at least ${MIN_PSK_BYTES * 8} are needed (psktool makes 256-bit keys).`);
    if (key.length > MAX_PSK_BYTES) throw new UsageError(`${where}: the key of "${identity}" is longer than ${MAX_PSK_BYTES} bytes.`);
    if (keys.has(identity)) throw new UsageError(`${where}: identity "${identity}" appears twice.`);
    keys.set(identity, key);
  }
  if (keys.size === 0) throw new UsageError(`The TLS key file ${file} holds no key; create one with: psktool -u NAME -p ${file}`);
  const warning =
    (st.mode & 0o077) !== 0
      ? `the TLS key file ${file} is readable or writable by others (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}); anyone who reads it can connect: chmod 600 ${file}`
      : null;
  return { file, keys, warning };
}

export interface TlsResult {
  socket: tls.TLSSocket;
  identity: string;
}

/**
 * Server side of NBD_OPT_STARTTLS: runs the TLS handshake on `raw` (the option reply already sent) and
 * resolves with the TLS socket once it is secure; rejects when the client fails to authenticate.
 */
export function startTls(raw: Socket, psk: PskKeys, context: tls.SecureContext): Promise<TlsResult> {
  return new Promise((resolve, reject) => {
    let asked: string | null = null;
    const socket = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: context,
      requestCert: false,
      rejectUnauthorized: false,
      pskCallback: (_s: tls.TLSSocket, identity: string) => {
        asked = identity;
        return psk.keys.get(identity) ?? null;
      },
    } as tls.TLSSocketOptions);
    const fail = (err?: Error) => {
      cleanup();
      socket.destroy();
      let why: string;
      if (asked !== null && !psk.keys.has(asked)) why = `unknown PSK identity "${printable(asked)}"`;
      else if (asked !== null && /binder does not verify|decrypt|bad record mac/i.test(sslReason(err))) why = `wrong key for PSK identity "${printable(asked)}"`;
      else if (err) why = sslReason(err);
      else why = 'the client closed the connection';
      reject(new Error(`TLS handshake failed: ${why}`));
    };
    const onSecure = () => {
      cleanup();
      resolve({ socket, identity: asked ?? '' });
    };
    const onError = (err: Error) => fail(err);
    const onClose = () => fail();
    const cleanup = () => {
      socket.off('secure', onSecure);
      socket.off('error', onError);
      socket.off('close', onClose);
    };
    socket.once('secure', onSecure);
    socket.on('error', onError);
    socket.once('close', onClose);
  });
}

/** The shared TLS settings of one server. */
export function pskContext(): tls.SecureContext {
  return tls.createSecureContext({ ciphers: PSK_CIPHERS, minVersion: 'TLSv1.2', honorCipherOrder: true } as tls.SecureContextOptions);
}

/** OpenSSL's short reason ("binder does not verify") instead of its multi-line error text. */
function sslReason(err: Error | undefined): string {
  if (!err) return '';
  const e = err as Error & { reason?: string; code?: string };
  return (e.reason ?? e.message.split('\n')[0] ?? e.code ?? 'error').trim();
}

function printable(text: string): string {
  return text.slice(0, MAX_IDENTITY).replace(/[\x00-\x1f\x7f-\x9f]/g, '?');
}
