import { once } from 'node:events';
import { chmodSync } from 'node:fs';
import * as net from 'node:net';
import type * as tls from 'node:tls';
import { IntegrityError } from '../errors.js';
import { ByteBudget } from './budget.js';
import type { NbdExport } from './export.js';
import {
  BASE_ALLOCATION,
  BASE_ALLOCATION_ID,
  CMD,
  CMD_FLAG,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  MAX_STRING,
  NBD_ERR,
  NBDMAGIC,
  OPT,
  OPTION_REPLY_MAGIC,
  REP,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STRUCTURED_REPLY_MAGIC,
  TF,
} from './protocol.js';
import { ConnectionClosed, SocketReader } from './socketReader.js';
import { pskContext, startTls, type PskKeys } from './tls.js';

/** One name a client can ask for, and what `NBD_OPT_LIST` / `NBD_INFO_DESCRIPTION` say about it. */
export interface ExportEntry {
  name: string;
  description: string;
  export: NbdExport;
}

/** Resource limits of a server (the `[nbd]` section of appliance.conf, overridable on the command line). */
export interface NbdLimits {
  /** Connections open at once (in the handshake or transmitting); more are closed at once. */
  maxConnections: number;
  /** A client must reach the transmission phase (TLS handshake included) within this many ms. */
  handshakeTimeoutMs: number;
  /** A transmitting client with no request in flight that sends nothing for this long is disconnected (0 = never). */
  idleTimeoutMs: number;
  /** A client that stops sending in the middle of a request, or stops reading replies, for this long is disconnected (0 = never). */
  stallTimeoutMs: number;
  /** Bytes of request data (write payloads, read results) in flight across all connections. */
  requestMemory: number;
}

export const DEFAULT_LIMITS: NbdLimits = {
  maxConnections: 16,
  handshakeTimeoutMs: 10_000,
  idleTimeoutMs: 0,
  stallTimeoutMs: 30_000,
  requestMemory: 128 * 2 ** 20,
};

export interface NbdServerOptions {
  exports: ExportEntry[];
  /** What the empty export name ("default export") means, if anything. */
  defaultExport?: NbdExport | null;
  /** TLS with pre-shared keys, required of every client before any other option (FORCEDTLS). */
  tls?: PskKeys | null;
  /** Answer NBD_OPT_LIST with NBD_REP_ERR_POLICY (export names are secrets). */
  hideList?: boolean;
  limits?: Partial<NbdLimits>;
  /** Diagnostics (connections with --verbose, errors always). */
  log?: (message: string) => void;
  verbose?: boolean;
}

export type ListenAddress = { host: string; port: number } | { path: string };

/** Requests one connection may have in flight before the server stops reading more from it. */
const MAX_IN_FLIGHT = 16;
/** Bytes of request data (write payloads, read results) one connection may have in flight. */
const MAX_IN_FLIGHT_BYTES = 64 * 2 ** 20;
/** Extents in one BLOCK_STATUS reply (a client asks again for the rest). */
const MAX_EXTENTS = 4096;
/** Preferred request size advertised in NBD_INFO_BLOCK_SIZE (the overlay's granule). */
const PREFERRED_BLOCK = 4096;
/** How long a shutdown waits for requests in flight before closing connections. */
const SHUTDOWN_GRACE_MS = 5000;
/** Options one connection may send before it is considered abusive. */
const MAX_OPTIONS = 10_000;
/** Output is written in pieces of this size… */
const OUTPUT_PIECE = 1024 * 1024;
/** …with at most this much written and not yet taken by the kernel. */
const OUTPUT_WINDOW = 8 * 2 ** 20;
/** TCP keepalive: a vanished peer of an idle connection is noticed after about this long plus the probes. */
const KEEPALIVE_MS = 60_000;

/**
 * An NBD server (fixed newstyle handshake only) over TCP or a Unix socket. Every connection is independent:
 * its requests run concurrently (replies may come out of order, as the protocol allows), a failing or
 * vanishing client only ends its own connection, and all share the exports (and so the block cache and
 * the overlays). What a client can make the server hold is bounded: a number of connections, a deadline
 * for the handshake, at most 64 KiB per option and 32 MiB per request, and one byte budget for all
 * request data in flight.
 */
export class NbdServer {
  private readonly server: net.Server;
  private readonly connections = new Set<{ conn: Connection; done: Promise<void> }>();
  private readonly byName = new Map<string, ExportEntry>();
  private stopping = false;
  private serial = 0;
  readonly limits: NbdLimits;
  readonly budget: ByteBudget;
  readonly tlsContext: tls.SecureContext | null;

  constructor(private readonly opts: NbdServerOptions) {
    for (const e of opts.exports) if (!this.byName.has(e.name)) this.byName.set(e.name, e);
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.budget = new ByteBudget(Math.max(this.limits.requestMemory, MAX_PAYLOAD));
    this.tlsContext = opts.tls ? pskContext() : null;
    this.server = net.createServer((socket) => this.accept(socket));
  }

  get exportEntries(): ExportEntry[] {
    return [...this.byName.values()];
  }

  get psk(): PskKeys | null {
    return this.opts.tls ?? null;
  }

  get hideList(): boolean {
    return !!this.opts.hideList;
  }

  lookup(name: string): NbdExport | null {
    if (name === '') return this.opts.defaultExport ?? null;
    return this.byName.get(name)?.export ?? null;
  }

  describe(name: string): string {
    return this.byName.get(name)?.description ?? (name === '' ? 'default export' : '');
  }

  log(message: string): void {
    this.opts.log?.(message);
  }

  get verbose(): boolean {
    return !!this.opts.verbose;
  }

  get isStopping(): boolean {
    return this.stopping;
  }

  /**
   * Starts listening; resolves with the bound address (the real port when 0 was asked). A Unix socket is
   * created with mode 0600 (under a umask of 0177, so it is never reachable by others, not even for an
   * instant): only its owner (and root) can connect.
   */
  listen(address: ListenAddress): Promise<ListenAddress> {
    return new Promise((resolve, reject) => {
      let oldMask: number | null = null;
      const restoreMask = () => {
        if (oldMask !== null) process.umask(oldMask);
        oldMask = null;
      };
      const onError = (err: Error) => {
        restoreMask();
        reject(err);
      };
      this.server.once('error', onError);
      const done = () => {
        restoreMask();
        this.server.off('error', onError);
        this.server.on('error', (err) => this.log(`server error: ${err.message}`));
        const a = this.server.address();
        if (typeof a === 'string') {
          try {
            chmodSync(a, 0o600);
          } catch (err) {
            reject(err);
            return;
          }
          resolve({ path: a });
        } else if (a) resolve({ host: a.address, port: a.port });
        else reject(new Error('the server has no address'));
      };
      if ('path' in address) {
        oldMask = process.umask(0o177);
        try {
          this.server.listen(address.path, done);
        } finally {
          // bind() ran synchronously inside listen(): the socket file exists with mode 0600 already.
          restoreMask();
        }
      } else this.server.listen(address.port, address.host, done);
    });
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  private accept(socket: net.Socket): void {
    if (this.stopping) {
      socket.destroy();
      return;
    }
    const id = ++this.serial;
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : `unix socket client #${id}`;
    if (this.connections.size >= this.limits.maxConnections) {
      this.log(`${peer}: refused: ${this.connections.size} connections are open, the maximum (max_connections = ${this.limits.maxConnections})`);
      socket.destroy();
      return;
    }
    const conn = new Connection(this, socket, peer);
    const done = conn.run().finally(() => this.connections.delete(entry));
    const entry = { conn, done };
    this.connections.add(entry);
  }

  /**
   * Stops accepting connections, lets requests in flight finish (up to a grace period), and closes every
   * connection. Resolves when all are closed.
   */
  async close(graceMs = SHUTDOWN_GRACE_MS): Promise<void> {
    this.stopping = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all(
      [...this.connections].map(async (c) => {
        await c.conn.shutdown(graceMs);
        await c.done;
      }),
    );
    await closed;
  }
}

interface Negotiated {
  exp: NbdExport;
  structured: boolean;
  blockStatus: boolean;
}

/** One client connection: handshake (with STARTTLS when TLS is required), option haggling, then the transmission phase. */
class Connection {
  /** The stream spoken on: the TCP/Unix socket, or the TLS socket on top of it after STARTTLS. */
  private socket: net.Socket | tls.TLSSocket;
  private reader: SocketReader;
  private readonly closed: Promise<void>;
  private inFlight = 0;
  private inFlightBytes = 0;
  /** Woken when no request is in flight. */
  private readonly idle: (() => void)[] = [];
  /** Woken when a request slot frees up. */
  private readonly slots: (() => void)[] = [];
  private transmitting = false;
  private stopping = false;
  /** Replies waiting to be written, in order. */
  private readonly output: { parts: Buffer[]; resolve: () => void }[] = [];
  /** Bytes written to the socket whose write has not completed. */
  private outstanding = 0;
  private outputTimer: NodeJS.Timeout | null = null;
  private tls = false;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private idleTimer: NodeJS.Timeout | null = null;
  /** Between a request header and the end of its payload. */
  private midRequest = false;
  /** Why the server ended the connection (logged instead of the resulting read error). */
  private endedBecause: string | null = null;

  constructor(
    private readonly server: NbdServer,
    private readonly raw: net.Socket,
    private readonly peer: string,
  ) {
    raw.setNoDelay?.(true);
    this.socket = raw;
    this.reader = new SocketReader(raw, undefined, () => this.activity());
    this.closed = new Promise((resolve) => raw.once('close', () => resolve()));
    raw.once('close', () => this.flushOutput());
  }

  async run(): Promise<void> {
    if (this.server.verbose) this.server.log(`connection from ${this.peer}`);
    const { handshakeTimeoutMs } = this.server.limits;
    if (handshakeTimeoutMs > 0) {
      this.handshakeTimer = setTimeout(() => this.abort(`handshake not completed within ${handshakeTimeoutMs / 1000} s (handshake_timeout)`), handshakeTimeoutMs).unref();
    }
    try {
      const n = await this.negotiate();
      this.clearHandshakeTimer();
      if (n) {
        if (this.server.verbose) this.server.log(`${this.peer}: serving version ${n.exp.version.id}${n.structured ? ' (structured replies)' : ''}${this.tls ? ' over TLS' : ''}`);
        if (this.raw.remoteAddress) this.raw.setKeepAlive(true, KEEPALIVE_MS);
        await this.transmit(n);
      }
    } catch (err) {
      if (this.endedBecause) this.server.log(`${this.peer}: ${this.endedBecause}; connection closed`);
      else if (!(err instanceof ConnectionClosed) && !(err instanceof ProtocolViolation && this.stopping)) {
        this.server.log(`${this.peer}: ${(err as Error).message}; connection closed`);
      }
    } finally {
      this.clearHandshakeTimer();
      if (this.idleTimer) clearTimeout(this.idleTimer);
      // After a clean end (NBD_OPT_ABORT, NBD_CMD_DISC) let the last reply reach the client first.
      if (this.socket.writableEnded && !this.socket.writableFinished && !this.socket.destroyed) {
        await Promise.race([once(this.socket, 'finish').catch(() => undefined), this.closed, delay(2000)]);
      }
      // Replies of requests still running are dropped (the socket is gone); other clients are unaffected.
      this.destroy();
      await this.closed;
      // Requests already started still complete (a write lands in the overlay or fails as a whole), so that
      // once every connection is done nothing touches the exports any more.
      await this.drain();
      if (this.server.verbose) this.server.log(`${this.peer}: disconnected`);
    }
  }

  async shutdown(graceMs: number): Promise<void> {
    this.stopping = true;
    if (!this.transmitting) {
      this.destroy();
    } else {
      const timer = new Promise<void>((resolve) => setTimeout(resolve, graceMs).unref());
      await Promise.race([this.drain(), timer]);
      this.destroy();
    }
    await this.closed;
  }

  /** Ends the connection at once for a reason the server logs (timeouts). */
  private abort(reason: string): void {
    if (this.endedBecause || this.raw.destroyed) return;
    this.endedBecause = reason;
    this.destroy();
  }

  private destroy(): void {
    if (this.socket !== this.raw) this.socket.destroy();
    this.raw.destroy();
  }

  private clearHandshakeTimer(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
  }

  /** Data arrived or a request finished: the idle timer starts again. */
  private activity(): void {
    this.idleTimer?.refresh();
  }

  private drain(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  // ------------------------------------------------------------------------------------------- output

  private get open(): boolean {
    return !this.socket.destroyed && this.socket.writable;
  }

  /**
   * Queues the buffers as one contiguous message; resolves once all of it has been handed to the kernel
   * (so the memory of a reply is accounted for until it is really gone). The queue is written in pieces
   * of at most OUTPUT_PIECE bytes with at most OUTPUT_WINDOW bytes outstanding: progress is seen piece by
   * piece, and a client that takes nothing for the stall timeout while replies wait is disconnected (it
   * would otherwise hold its share of the request memory for ever).
   */
  private send(...parts: Buffer[]): Promise<void> {
    if (!this.open) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.output.push({ parts: parts.filter((p) => p.length > 0), resolve });
      this.pump();
    });
  }

  private pump(): void {
    if (!this.open) {
      this.flushOutput();
      return;
    }
    const socket = this.socket;
    let corked = false;
    while (this.outstanding < OUTPUT_WINDOW && this.output.length > 0) {
      const msg = this.output[0]!;
      if (msg.parts.length === 0) {
        this.output.shift();
        msg.resolve();
        continue;
      }
      const part = msg.parts[0]!;
      const piece = part.length > OUTPUT_PIECE ? part.subarray(0, OUTPUT_PIECE) : part;
      if (piece.length === part.length) msg.parts.shift();
      else msg.parts[0] = part.subarray(OUTPUT_PIECE);
      const last = msg.parts.length === 0;
      if (last) this.output.shift();
      if (!corked) {
        socket.cork();
        corked = true;
      }
      this.outstanding += piece.length;
      socket.write(piece, () => {
        this.outstanding -= piece.length;
        this.outputTimer?.refresh();
        if (last) msg.resolve();
        this.pump();
      });
    }
    if (corked) socket.uncork();
    const stallMs = this.server.limits.stallTimeoutMs;
    if (this.outstanding > 0 && stallMs > 0) {
      this.outputTimer ??= setTimeout(() => {
        this.outputTimer = null;
        if (this.outstanding > 0) this.abort(`the client stopped reading replies for ${stallMs / 1000} s (stall_timeout)`);
      }, stallMs).unref();
    } else if (this.outputTimer) {
      clearTimeout(this.outputTimer);
      this.outputTimer = null;
    }
  }

  /** The connection is gone: whoever waits for output to be written stops waiting. */
  private flushOutput(): void {
    for (const m of this.output.splice(0)) m.resolve();
    if (this.outputTimer) clearTimeout(this.outputTimer);
    this.outputTimer = null;
  }

  // ------------------------------------------------------------------------------------- handshake

  private optionHeader(option: number, type: number, length: number): Buffer {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(length, 16);
    return h;
  }

  private optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Promise<void> {
    return this.send(this.optionHeader(option, type, data.length), data);
  }

  private optionError(option: number, type: number, message: string): Promise<void> {
    return this.optionReply(option, type, Buffer.from(message.slice(0, MAX_STRING), 'utf8'));
  }

  /** NBD_OPT_STARTTLS acknowledged: the TLS handshake runs on the raw socket, then everything goes through TLS. */
  private async startTls(option: number): Promise<void> {
    const psk = this.server.psk!;
    // send() resolves once the ACK is written: only then may the socket change hands.
    await this.send(this.optionHeader(option, REP.ACK, 0));
    // The client may only speak TLS after our ACK; bytes it sent before are a protocol violation.
    const early = this.reader.detach();
    if (early.length > 0) throw new ProtocolViolation('data received between NBD_OPT_STARTTLS and its reply');
    const { socket, identity } = await startTls(this.raw, psk, this.server.tlsContext!);
    this.socket = socket;
    this.reader = new SocketReader(socket, undefined, () => this.activity());
    this.tls = true;
    if (this.server.verbose) this.server.log(`${this.peer}: TLS ${socket.getProtocol()} ${socket.getCipher().name}, PSK identity "${identity}"`);
  }

  private async negotiate(): Promise<Negotiated | null> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    await this.send(hello);
    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    if (clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) throw new ProtocolViolation(`unknown client flags 0x${clientFlags.toString(16)}`);
    const noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
    const tlsRequired = this.server.psk !== null;
    if (tlsRequired && !(clientFlags & FLAG_C_FIXED_NEWSTYLE)) throw new ProtocolViolation('TLS is required, which needs fixed newstyle negotiation');
    let structured = false;
    let meta: { exp: NbdExport; baseAllocation: boolean } | null = null;

    for (let options = 0; ; options++) {
      if (options > MAX_OPTIONS) throw new ProtocolViolation('too many options');
      const h = await this.reader.read(16);
      if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolViolation('bad option magic');
      const option = h.readUInt32BE(8);
      const length = h.readUInt32BE(12);
      if (length > MAX_OPTION_LENGTH) throw new ProtocolViolation(`option ${option} is too long (${length} bytes)`);
      const data = await this.reader.read(length);
      if (this.stopping && option !== OPT.ABORT) {
        await this.optionError(option, REP.ERR_SHUTDOWN, 'the server is shutting down');
        continue;
      }
      if (tlsRequired && !this.tls) {
        // FORCEDTLS: nothing but STARTTLS and ABORT before TLS is up.
        if (option === OPT.STARTTLS) {
          if (length !== 0) await this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
          else await this.startTls(option);
          continue;
        }
        if (option === OPT.EXPORT_NAME) throw new ProtocolViolation('NBD_OPT_EXPORT_NAME without TLS, which this server requires');
        if (option !== OPT.ABORT) {
          await this.optionError(option, REP.ERR_TLS_REQD, 'this server requires TLS: connect with nbds:// or nbds+unix:// and its pre-shared key (tls-psk-file=…)');
          continue;
        }
      }
      switch (option) {
        case OPT.EXPORT_NAME: {
          const name = data.toString('utf8');
          const exp = this.server.lookup(name);
          // This option cannot carry an error: an unknown export ends the session.
          if (!exp) throw new ProtocolViolation(`no export named "${printable(name)}"`);
          const r = Buffer.alloc(noZeroes ? 10 : 134);
          r.writeBigUInt64BE(BigInt(exp.size), 0);
          r.writeUInt16BE(transmissionFlags(exp, structured), 8);
          await this.send(r);
          return { exp, structured, blockStatus: structured && meta?.exp === exp && meta.baseAllocation };
        }
        case OPT.ABORT:
          await this.optionReply(option, REP.ACK);
          this.socket.end();
          return null;
        case OPT.STARTTLS:
          if (this.tls) await this.optionError(option, REP.ERR_INVALID, 'TLS is already active');
          else await this.optionError(option, REP.ERR_POLICY, 'TLS is not enabled on this server (start it with --tls-psk FILE)');
          break;
        case OPT.LIST:
          if (length !== 0) {
            await this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          if (this.server.hideList) {
            await this.optionError(option, REP.ERR_POLICY, 'listing exports is disabled on this server (their names are secret)');
            break;
          }
          for (const e of this.server.exportEntries) {
            const name = Buffer.from(e.name, 'utf8');
            const body = Buffer.alloc(4 + name.length);
            body.writeUInt32BE(name.length, 0);
            name.copy(body, 4);
            await this.optionReply(option, REP.SERVER, Buffer.concat([body, Buffer.from(e.description, 'utf8')]));
          }
          await this.optionReply(option, REP.ACK);
          break;
        case OPT.STRUCTURED_REPLY:
          if (length !== 0) {
            await this.optionError(option, REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
            break;
          }
          structured = true;
          await this.optionReply(option, REP.ACK);
          break;
        case OPT.INFO:
        case OPT.GO: {
          const req = parseInfoRequest(data);
          if (!req) {
            await this.optionError(option, REP.ERR_INVALID, 'malformed NBD_OPT_INFO/GO request');
            break;
          }
          const exp = this.server.lookup(req.name);
          if (!exp) {
            const hint = this.server.hideList ? 'use the export URI printed when the server started' : 'list them with NBD_OPT_LIST (nbdinfo --list)';
            await this.optionError(option, REP.ERR_UNKNOWN, `no export named "${req.name}"; ${hint}`);
            break;
          }
          const info = Buffer.alloc(12);
          info.writeUInt16BE(INFO.EXPORT, 0);
          info.writeBigUInt64BE(BigInt(exp.size), 2);
          info.writeUInt16BE(transmissionFlags(exp, structured), 10);
          await this.optionReply(option, REP.INFO, info);
          for (const type of new Set(req.infos)) {
            if (type === INFO.NAME || type === INFO.DESCRIPTION) {
              const text = Buffer.from(type === INFO.NAME ? req.name : this.server.describe(req.name), 'utf8');
              const b = Buffer.alloc(2 + text.length);
              b.writeUInt16BE(type, 0);
              text.copy(b, 2);
              await this.optionReply(option, REP.INFO, b);
            } else if (type === INFO.BLOCK_SIZE) {
              const b = Buffer.alloc(14);
              b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
              b.writeUInt32BE(1, 2);
              b.writeUInt32BE(PREFERRED_BLOCK, 6);
              b.writeUInt32BE(MAX_PAYLOAD, 10);
              await this.optionReply(option, REP.INFO, b);
            }
          }
          await this.optionReply(option, REP.ACK);
          if (option === OPT.GO) return { exp, structured, blockStatus: structured && meta?.exp === exp && meta.baseAllocation };
          break;
        }
        case OPT.LIST_META_CONTEXT:
        case OPT.SET_META_CONTEXT: {
          if (!structured) {
            await this.optionError(option, REP.ERR_INVALID, 'negotiate structured replies (NBD_OPT_STRUCTURED_REPLY) first');
            break;
          }
          const req = parseMetaRequest(data);
          if (!req) {
            await this.optionError(option, REP.ERR_INVALID, 'malformed meta context request');
            break;
          }
          const exp = this.server.lookup(req.name);
          if (!exp) {
            if (option === OPT.SET_META_CONTEXT) meta = null;
            await this.optionError(option, REP.ERR_UNKNOWN, `no export named "${req.name}"`);
            break;
          }
          const reply = (id: number) => {
            const name = Buffer.from(BASE_ALLOCATION);
            const b = Buffer.alloc(4 + name.length);
            b.writeUInt32BE(id, 0);
            name.copy(b, 4);
            return this.optionReply(option, REP.META_CONTEXT, b);
          };
          if (option === OPT.LIST_META_CONTEXT) {
            if (req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION)) await reply(0);
          } else {
            const selected = req.queries.includes(BASE_ALLOCATION);
            meta = { exp, baseAllocation: selected };
            if (selected) await reply(BASE_ALLOCATION_ID);
          }
          await this.optionReply(option, REP.ACK);
          break;
        }
        default:
          await this.optionError(option, REP.ERR_UNSUP, `option ${option} is not supported by this server`);
      }
    }
  }

  // ---------------------------------------------------------------------------------- transmission

  private async transmit(n: Negotiated): Promise<void> {
    this.transmitting = true;
    const { idleTimeoutMs, stallTimeoutMs } = this.server.limits;
    const stall = { stallMs: stallTimeoutMs };
    if (idleTimeoutMs > 0) {
      const onIdle = () => {
        // Idle = nothing in flight and no part of a request received; otherwise look again later.
        if (this.inFlight === 0 && !this.midRequest && this.reader.pending === 0) this.abort(`idle for ${idleTimeoutMs / 1000} s (idle_timeout)`);
        else this.idleTimer?.refresh();
      };
      this.idleTimer = setTimeout(onIdle, idleTimeoutMs).unref();
    }
    for (;;) {
      const h = await this.reader.read(28, stall);
      if (h.readUInt32BE(0) !== REQUEST_MAGIC) throw new ProtocolViolation('bad request magic');
      const req: Request = {
        flags: h.readUInt16BE(4),
        type: h.readUInt16BE(6),
        cookie: Buffer.from(h.subarray(8, 16)),
        offset: h.readBigUInt64BE(16),
        length: h.readUInt32BE(24),
        payload: null,
      };
      this.midRequest = req.type === CMD.WRITE && req.length > 0;
      if (req.type === CMD.DISC) {
        await this.drain();
        this.socket.end();
        return;
      }
      if (req.type === CMD.WRITE) {
        // Decided from the header alone, before a byte of the payload is read or any memory is set aside.
        if (req.length > MAX_PAYLOAD) {
          // The advertised maximum: a client that ignores it is broken or hostile (the protocol allows a hard disconnect).
          throw new ProtocolViolation(`write of ${req.length} bytes, more than the maximum payload of ${MAX_PAYLOAD} bytes`);
        }
        const refusal = n.exp.readOnly
          ? { error: NBD_ERR.EPERM, message: 'the export is read-only (serve with --rw to write to an overlay)' }
          : req.offset + BigInt(req.length) > BigInt(n.exp.size)
            ? { error: NBD_ERR.EINVAL, message: 'write beyond the end of the export' }
            : null;
        if (refusal) {
          // Refused at once; the payload is then read and dropped in bounded pieces to stay in step with the client.
          await this.errorReply(n, req.cookie, refusal.error, refusal.message);
          await this.reader.skip(req.length, { ...stall, stalledFromStart: true });
          this.midRequest = false;
          continue;
        }
      }
      // Bounded work per connection (a request count and the bytes of data in flight), and one byte budget
      // for the request data of all connections.
      const cost = req.type === CMD.READ || req.type === CMD.WRITE ? Math.min(req.length, MAX_PAYLOAD) : 0;
      while (this.inFlight > 0 && (this.inFlight >= MAX_IN_FLIGHT || this.inFlightBytes + cost > MAX_IN_FLIGHT_BYTES)) {
        await new Promise<void>((resolve) => this.slots.push(resolve));
      }
      this.inFlight++;
      this.inFlightBytes += cost;
      let budgeted = false;
      const release = () => {
        if (budgeted) this.server.budget.release(cost);
        this.inFlight--;
        this.inFlightBytes -= cost;
        this.activity();
        for (const wake of this.slots.splice(0)) wake();
        if (this.inFlight === 0) for (const wake of this.idle.splice(0)) wake();
      };
      try {
        if (cost > 0) {
          await this.server.budget.acquire(cost);
          budgeted = true;
        }
        if (req.type === CMD.WRITE) req.payload = await this.reader.read(req.length, { ...stall, stalledFromStart: true });
        this.midRequest = false;
      } catch (err) {
        release();
        throw err;
      }
      if (this.stopping || !this.open) {
        // Shutting down: requests already running finish, new ones are refused.
        await this.simpleReply(req.cookie, NBD_ERR.ESHUTDOWN).finally(release);
        continue;
      }
      this.handle(n, req)
        .catch((err: unknown) => this.server.log(`${this.peer}: ${(err as Error).message}`))
        .finally(release);
    }
  }

  private simpleReply(cookie: Buffer, error: number, data?: Buffer): Promise<void> {
    const h = Buffer.alloc(16);
    h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(error, 4);
    cookie.copy(h, 8);
    return data ? this.send(h, data) : this.send(h);
  }

  private chunkHeader(cookie: Buffer, flags: number, type: number, length: number): Buffer {
    const h = Buffer.alloc(20);
    h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    cookie.copy(h, 8);
    h.writeUInt32BE(length, 16);
    return h;
  }

  /** An error reply: a structured error chunk when structured replies are on, else a simple reply. */
  private errorReply(n: Negotiated, cookie: Buffer, error: number, message: string): Promise<void> {
    if (!n.structured) return this.simpleReply(cookie, error);
    const msg = Buffer.from(message.slice(0, 1024), 'utf8');
    const body = Buffer.alloc(6 + msg.length);
    body.writeUInt32BE(error, 0);
    body.writeUInt16BE(msg.length, 4);
    msg.copy(body, 6);
    return this.send(this.chunkHeader(cookie, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, body.length), body);
  }

  private async handle(n: Negotiated, req: Request): Promise<void> {
    const exp = n.exp;
    const inRange = req.offset + BigInt(req.length) <= BigInt(exp.size);
    const offset = Number(req.offset);
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    try {
      switch (req.type) {
        case CMD.READ:
          if (req.length > MAX_PAYLOAD) return await this.errorReply(n, req.cookie, NBD_ERR.EINVAL, 'read larger than the maximum payload (32 MiB)');
          if (!inRange) return await this.errorReply(n, req.cookie, NBD_ERR.EINVAL, 'read beyond the end of the export');
          return await this.read(n, req, offset);
        case CMD.WRITE:
          // Read-only exports, oversized and out-of-range writes were refused before their payload was read.
          if (req.length > 0) await exp.write(offset, req.payload!, fua);
          return await this.simpleReply(req.cookie, 0);
        case CMD.TRIM:
        case CMD.WRITE_ZEROES:
          if (exp.readOnly) return await this.errorReply(n, req.cookie, NBD_ERR.EPERM, 'the export is read-only');
          if (!inRange) return await this.errorReply(n, req.cookie, NBD_ERR.EINVAL, 'request beyond the end of the export');
          if (req.length > 0) await exp.zero(offset, req.length, fua);
          return await this.simpleReply(req.cookie, 0);
        case CMD.FLUSH:
          await exp.flush();
          return await this.simpleReply(req.cookie, 0);
        case CMD.BLOCK_STATUS: {
          if (!n.blockStatus) return await this.errorReply(n, req.cookie, NBD_ERR.EINVAL, 'no metadata context was selected');
          if (!inRange || req.length === 0) return await this.errorReply(n, req.cookie, NBD_ERR.EINVAL, 'block status request out of range');
          const extents = exp.extents(offset, req.length, req.flags & CMD_FLAG.REQ_ONE ? 1 : MAX_EXTENTS);
          const body = Buffer.alloc(4 + 8 * extents.length);
          body.writeUInt32BE(BASE_ALLOCATION_ID, 0);
          extents.forEach((e, i) => {
            body.writeUInt32BE(e.length, 4 + 8 * i);
            body.writeUInt32BE(e.flags, 8 + 8 * i);
          });
          return await this.send(this.chunkHeader(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE.BLOCK_STATUS, body.length), body);
        }
        default:
          return await this.errorReply(n, req.cookie, NBD_ERR.EINVAL, `command ${req.type} is not supported`);
      }
    } catch (err) {
      const message = err instanceof IntegrityError ? err.message : `I/O error: ${(err as Error).message}`;
      this.server.log(`${this.peer}: request ${commandName(req.type)} at offset ${offset} length ${req.length} failed: ${message}`);
      await this.errorReply(n, req.cookie, NBD_ERR.EIO, message);
    }
  }

  private async read(n: Negotiated, req: Request, offset: number): Promise<void> {
    const exp = n.exp;
    if (!n.structured) {
      const data = await exp.read(offset, req.length);
      return this.simpleReply(req.cookie, 0, data);
    }
    if (req.length === 0) return this.send(this.chunkHeader(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE.NONE, 0));
    // Holes are sent as OFFSET_HOLE chunks (no data on the wire, and the client learns they are zeros).
    const extents = exp.extents(offset, req.length);
    const data = extents.some((e) => !(e.flags & STATE_HOLE)) ? await exp.read(offset, req.length) : null;
    const parts: Buffer[] = [];
    let pos = 0;
    extents.forEach((e, i) => {
      const flags = i === extents.length - 1 ? REPLY_FLAG_DONE : 0;
      if (e.flags & STATE_HOLE) {
        const body = Buffer.alloc(12);
        body.writeBigUInt64BE(BigInt(offset + pos), 0);
        body.writeUInt32BE(e.length, 8);
        parts.push(this.chunkHeader(req.cookie, flags, REPLY_TYPE.OFFSET_HOLE, 12), body);
      } else {
        const at = Buffer.alloc(8);
        at.writeBigUInt64BE(BigInt(offset + pos), 0);
        parts.push(this.chunkHeader(req.cookie, flags, REPLY_TYPE.OFFSET_DATA, 8 + e.length), at, data!.subarray(pos, pos + e.length));
      }
      pos += e.length;
    });
    return this.send(...parts);
  }
}

interface Request {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: bigint;
  length: number;
  payload: Buffer | null;
}

/** The client broke the protocol: the connection is closed (a hard disconnect, as the protocol allows). */
class ProtocolViolation extends Error {}

function transmissionFlags(exp: NbdExport, _structured: boolean): number {
  let f = TF.HAS_FLAGS | TF.CAN_MULTI_CONN;
  if (exp.readOnly) f |= TF.READ_ONLY;
  else f |= TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES;
  return f;
}

function parseInfoRequest(data: Buffer): { name: string; infos: number[] } | null {
  if (data.length < 6) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 2 > data.length) return null;
  const name = data.subarray(4, 4 + nameLen).toString('utf8');
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 4 + nameLen + 2 + 2 * count) return null;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLen + 2 * i));
  return { name, infos };
}

function parseMetaRequest(data: Buffer): { name: string; queries: string[] } | null {
  if (data.length < 8) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 4 > data.length) return null;
  const name = data.subarray(4, 4 + nameLen).toString('utf8');
  const count = data.readUInt32BE(4 + nameLen);
  let pos = 8 + nameLen;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return null;
    const len = data.readUInt32BE(pos);
    if (len > MAX_STRING || pos + 4 + len > data.length) return null;
    queries.push(data.subarray(pos + 4, pos + 4 + len).toString('utf8'));
    pos += 4 + len;
  }
  return pos === data.length ? { name, queries } : null;
}

/** Client-supplied text in the server's log: no terminal control characters, bounded length. */
function printable(text: string): string {
  return text.slice(0, 256).replace(/[\x00-\x1f\x7f-\x9f]/g, '?');
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

function commandName(type: number): string {
  return Object.entries(CMD).find(([, v]) => v === type)?.[0] ?? String(type);
}
