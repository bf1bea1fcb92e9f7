/**
 * `blocksafe nbd` against real NBD clients from Debian (libnbd-bin: nbdinfo, nbdcopy, nbdfuse; qemu-utils:
 * qemu-img, qemu-io) and a small raw protocol client for the error cases no client tool exposes. Every test
 * runs the real CLI as a child process and stops it with SIGINT, as a user would.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import test, { type ExecutionContext } from 'ava';
import {
  BIN,
  initKeyFileRepo,
  listObjects,
  makeImage,
  MiB,
  readRange,
  cliEnv,
  ROOT,
  run,
  runCli,
  runJson,
  runOk,
  runStatus,
  sha256File,
  tempDir,
  type Image,
  type RepoFixture,
  type VersionJson,
} from './helpers.js';

// ------------------------------------------------------------------------------------- required tools

const TOOLS: Record<string, string> = {
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdfuse: 'libnbd-bin',
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  fusermount3: 'fuse3',
  losetup: 'mount',
  'mkfs.ext4': 'e2fsprogs',
  psktool: 'gnutls-bin',
  useradd: 'passwd',
  runuser: 'util-linux',
};

/** Fails (never skips) the test when a client is missing, naming the Debian package to install. */
function requireTools(...names: string[]): void {
  const missing = names.filter((n) => spawnSync('sh', ['-c', `command -v ${n}`], { stdio: 'ignore' }).status !== 0);
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((m) => TOOLS[m] ?? m))];
    throw new Error(`NBD client tool(s) missing: ${missing.join(', ')}; install them with: apt-get install -y ${pkgs.join(' ')}`);
  }
}

// ------------------------------------------------------------------------------------------- fixture

/**
 * One repository for all tests (key file: fast to open). Volume "disk": 4 MiB blocks random, zero, text,
 * duplicate of block 0, zero, and a 1 234 567-byte tail (not a multiple of 512). Volume "fs": a 32 MiB ext4
 * filesystem made with mkfs.ext4 -d from a directory of files.
 */
interface Fixture {
  dir: string;
  repo: RepoFixture;
  image: Image;
  disk: VersionJson;
  fsSource: string;
  fsImage: string;
  fs: VersionJson;
}

let fixture: Promise<Fixture> | undefined;
function setup(): Promise<Fixture> {
  fixture ??= (async () => {
    const dir = await fs.mkdtemp(path.join(process.env.TMPDIR ?? '/tmp', 'blocksafe-nbd-'));
    const repo = await initKeyFileRepo(path.join(dir, 'repo'));
    const image = await makeImage(path.join(dir, 'disk.img'), {
      blocks: ['random', 'zero', 'text', { dup: 0 }, 'zero'],
      tail: { bytes: 1_234_567, kind: 'random' },
      seed: 'nbd',
    });
    const disk = await runJson<VersionJson>(['backup', ...repo.args, image.path, 'disk'], { env: repo.env });
    const fsSource = path.join(dir, 'fs-src');
    await fs.mkdir(path.join(fsSource, 'docs'), { recursive: true });
    await fs.writeFile(path.join(fsSource, 'docs', 'readme.txt'), 'blocksafe nbd test\n'.repeat(5000));
    await makeImage(path.join(fsSource, 'random.bin'), { blocks: ['random'], blockSize: 3 * MiB + 17, seed: 'fsfile' });
    const fsImage = path.join(dir, 'fs.img');
    requireTools('mkfs.ext4');
    await run('mkfs.ext4', ['-q', '-d', fsSource, fsImage, '32M']);
    const fsVersion = await runJson<VersionJson>(['backup', ...repo.args, fsImage, 'fs'], { env: repo.env });
    return { dir, repo, image, disk, fsSource, fsImage, fs: fsVersion };
  })();
  return fixture;
}

test.after.always(async () => {
  if (fixture) await fs.rm((await fixture).dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------- the server

interface Listening {
  address: string | null;
  socket: string | null;
  tls: string | null;
  tls_identities: string[];
  secret_names: boolean;
  read_only: boolean;
  max_connections: number;
  exports: { name: string; version: string; size: number; alias: boolean; uri: string }[];
}

interface Server {
  proc: ChildProcess;
  /** TCP port, or 0 on a Unix socket. */
  port: number;
  /** Where a RawClient connects: the socket path or the TCP port. */
  target: string | number;
  listening: Listening;
  /** The printed URI of an export (by its plain name: the secret prefix of --insecure-tcp is found). */
  uri: (name: string) => string;
  /** SIGINT, then the exit code and all output. */
  stop: () => Promise<{ code: number | null; stdout: string; stderr: string; events: { event: string; [field: string]: unknown }[] }>;
  stderr: () => string;
  pid: number;
}

/**
 * Starts `blocksafe nbd --json` and waits until it listens (its first JSON line). Stopped at teardown.
 * Without `listen` arguments the server uses its default: a new private Unix socket.
 */
async function startServer(t: ExecutionContext, repo: RepoFixture, args: string[], listen: string[] = [], env: Record<string, string> = {}): Promise<Server> {
  const proc = spawn(process.execPath, [BIN, 'nbd', ...repo.args, ...listen, '--json', ...args], { cwd: ROOT, env: cliEnv({ ...repo.env, ...env }), stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (b: Buffer) => (stdout += b.toString()));
  proc.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  let stopped = false;
  t.teardown(async () => {
    if (!stopped && proc.exitCode === null) {
      proc.kill('SIGINT');
      await Promise.race([exited, delay(8000)]);
      if (proc.exitCode === null) proc.kill('SIGKILL');
    }
  });
  // No deadline of our own (a loaded machine may take long to start it): ava's timeout bounds every wait.
  while (!stdout.includes('\n')) {
    if (proc.exitCode !== null) throw new Error(`blocksafe nbd exited ${proc.exitCode} before listening:\n${stderr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  const listening = JSON.parse(stdout.split('\n')[0]!) as Listening & { event: string };
  if (listening.event !== 'listening') throw new Error(`unexpected first line: ${stdout}`);
  const port = listening.address ? Number(listening.address.split(':').pop()) : 0;
  const uri = (name: string) => {
    const e = listening.exports.find((x) => x.name === name || x.name.endsWith(`/${name}`));
    if (e) return e.uri;
    // Not an export (a test of unknown names): the URI the server would print for it.
    return listening.socket ? `nbd+unix:///${name}?socket=${listening.socket}` : `nbd://127.0.0.1:${port}/${name}`;
  };
  return {
    proc,
    pid: proc.pid!,
    port,
    target: listening.socket ?? port,
    listening,
    uri,
    stderr: () => stderr,
    stop: async () => {
      stopped = true;
      proc.kill('SIGINT');
      const code = await Promise.race([exited, delay(20_000).then(() => 'timeout' as const)]);
      if (code === 'timeout') {
        proc.kill('SIGKILL');
        throw new Error(`blocksafe nbd did not stop within 20 s after SIGINT:\n${stderr}`);
      }
      const events = stdout
        .split('\n')
        .filter((l) => l.trim())
        .map((l) => JSON.parse(l));
      return { code, stdout, stderr, events };
    },
  };
}

/** Polls `cond` until it holds (`_what` says what for the reader); ava's timeout ends a wait that never does. */
async function until(_what: string, cond: () => boolean | Promise<boolean>): Promise<void> {
  while (!(await cond())) await new Promise((r) => setTimeout(r, 20));
}

/** Resident memory of a process, from /proc. */
function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}

/** A pause that does not keep the test process alive (so a finished race does not delay the exit). */
function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

// ---------------------------------------------------------------------------------- raw NBD client

const NBD = {
  IHAVEOPT: 0x49484156454f5054n,
  OPT_EXPORT_NAME: 1,
  OPT_ABORT: 2,
  OPT_LIST: 3,
  OPT_STARTTLS: 5,
  OPT_GO: 7,
  OPT_STRUCTURED_REPLY: 8,
  OPT_LIST_META_CONTEXT: 9,
  OPT_SET_META_CONTEXT: 10,
  REP_ACK: 1,
  REP_SERVER: 2,
  REP_INFO: 3,
  REP_META_CONTEXT: 4,
  REP_ERR_UNSUP: 0x80000001,
  REP_ERR_POLICY: 0x80000002,
  REP_ERR_TLS_REQD: 0x80000005,
  REP_ERR_INVALID: 0x80000003,
  REP_ERR_UNKNOWN: 0x80000006,
  CMD_READ: 0,
  CMD_WRITE: 1,
  CMD_DISC: 2,
  CMD_FLUSH: 3,
  CMD_TRIM: 4,
  CMD_WRITE_ZEROES: 6,
  CMD_BLOCK_STATUS: 7,
  EPERM: 1,
  EINVAL: 22,
};

/** A deliberately small NBD client: enough to check replies byte by byte. */
class RawClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  private ended = false;
  private cookie = 1n;
  flags = 0;
  size = 0n;

  private constructor(public socket: net.Socket) {
    this.listen(socket);
  }

  private listen(socket: net.Socket): void {
    socket.on('data', (b: Buffer) => {
      this.buf = Buffer.concat([this.buf, b]);
      this.wake?.();
    });
    const end = () => {
      this.ended = true;
      this.wake?.();
    };
    socket.on('close', end);
    socket.on('error', end);
  }

  /** Connects (to a Unix socket path or a port on 127.0.0.1) without reading anything. */
  static async open(target: string | number): Promise<RawClient> {
    const socket = typeof target === 'string' ? net.connect(target) : net.connect(target, '127.0.0.1');
    await once(socket, 'connect');
    return new RawClient(socket);
  }

  static async connect(target: string | number): Promise<RawClient> {
    const c = await RawClient.open(target);
    const hello = await c.read(18);
    if (hello.subarray(0, 8).toString() !== 'NBDMAGIC' || hello.readBigUInt64BE(8) !== NBD.IHAVEOPT) throw new Error('bad server greeting');
    if ((hello.readUInt16BE(16) & 3) !== 3) throw new Error('server lacks FIXED_NEWSTYLE|NO_ZEROES');
    c.socket.write(Buffer.from([0, 0, 0, 3]));
    return c;
  }

  /** NBD_OPT_STARTTLS, then a TLS-PSK handshake (Node's client) on the same connection. */
  async startTls(identity: string, key: Buffer, opts: { version?: 'TLSv1.2' | 'TLSv1.3'; ciphers?: string } = {}): Promise<tls.TLSSocket> {
    const replies = await this.option(NBD.OPT_STARTTLS);
    if (replies.pop()!.type !== NBD.REP_ACK) throw new Error('STARTTLS refused');
    this.socket.removeAllListeners('data');
    const secure = tls.connect({
      socket: this.socket,
      pskCallback: () => ({ identity, psk: key }),
      ciphers: opts.ciphers ?? 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:ECDHE-PSK-CHACHA20-POLY1305',
      minVersion: opts.version ?? 'TLSv1.2',
      maxVersion: opts.version ?? 'TLSv1.3',
      checkServerIdentity: () => undefined,
    });
    await Promise.race([
      once(secure, 'secureConnect'),
      once(secure, 'error').then(([err]) => Promise.reject(err)),
      once(secure, 'close').then(() => Promise.reject(new Error('closed during the TLS handshake'))),
    ]);
    this.socket = secure;
    this.listen(secure);
    return secure;
  }

  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.ended) throw new Error('connection closed by the server');
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** True once the server has closed the connection (ava's timeout ends a wait for one that stays open). */
  async closed(): Promise<boolean> {
    while (!this.ended) await new Promise((r) => setTimeout(r, 20));
    return this.ended;
  }

  sendOption(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD.IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async option(opt: number, data: Buffer = Buffer.alloc(0)): Promise<{ type: number; data: Buffer }[]> {
    this.sendOption(opt, data);
    const replies: { type: number; data: Buffer }[] = [];
    for (;;) {
      const h = await this.read(20);
      if (h.readBigUInt64BE(0) !== 0x3e889045565a9n) throw new Error('bad option reply magic');
      if (h.readUInt32BE(8) !== opt) throw new Error('option reply for another option');
      const type = h.readUInt32BE(12);
      const body = await this.read(h.readUInt32BE(16));
      replies.push({ type, data: body });
      if (type === NBD.REP_ACK || type >= 0x80000000) return replies;
    }
  }

  static nameData(name: string, tail: Buffer): Buffer {
    const n = Buffer.from(name);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(n.length);
    return Buffer.concat([len, n, tail]);
  }

  static metaData(name: string, queries: string[]): Buffer {
    const count = Buffer.alloc(4);
    count.writeUInt32BE(queries.length);
    const qs = queries.map((q) => {
      const l = Buffer.alloc(4);
      l.writeUInt32BE(Buffer.byteLength(q));
      return Buffer.concat([l, Buffer.from(q)]);
    });
    return RawClient.nameData(name, Buffer.concat([count, ...qs]));
  }

  async go(name: string): Promise<{ type: number; data: Buffer }[]> {
    const replies = await this.option(NBD.OPT_GO, RawClient.nameData(name, Buffer.from([0, 0])));
    const info = replies.find((r) => r.type === NBD.REP_INFO && r.data.readUInt16BE(0) === 0);
    if (info) {
      this.size = info.data.readBigUInt64BE(2);
      this.flags = info.data.readUInt16BE(10);
    }
    return replies;
  }

  sendRequest(type: number, offset: number, length: number, payload?: Buffer, flags = 0): bigint {
    const h = Buffer.alloc(28);
    const cookie = this.cookie++;
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.socket.write(payload ? Buffer.concat([h, payload]) : h);
    return cookie;
  }

  /** Simple reply (no structured replies negotiated): the error and, for a successful read, the data. */
  async simple(type: number, offset: number, length: number, payload?: Buffer): Promise<{ error: number; data?: Buffer }> {
    const cookie = this.sendRequest(type, offset, length, payload);
    const h = await this.read(16);
    if (h.readUInt32BE(0) !== 0x67446698) throw new Error(`expected a simple reply, magic ${h.readUInt32BE(0).toString(16)}`);
    if (h.readBigUInt64BE(8) !== cookie) throw new Error('reply for another request');
    const error = h.readUInt32BE(4);
    if (type === NBD.CMD_READ && error === 0) return { error, data: await this.read(length) };
    return { error };
  }

  /** All reply chunks of one request (structured replies negotiated). */
  async structured(type: number, offset: number, length: number, flags = 0): Promise<{ type: number; flags: number; data: Buffer; simpleError?: number }[]> {
    const cookie = this.sendRequest(type, offset, length, undefined, flags);
    const chunks: { type: number; flags: number; data: Buffer; simpleError?: number }[] = [];
    for (;;) {
      const magic = (await this.read(4)).readUInt32BE(0);
      if (magic === 0x67446698) {
        const rest = await this.read(12);
        chunks.push({ type: -1, flags: 1, data: Buffer.alloc(0), simpleError: rest.readUInt32BE(0) });
        return chunks;
      }
      if (magic !== 0x668e33ef) throw new Error(`bad reply magic ${magic.toString(16)}`);
      const h = await this.read(16);
      if (h.readBigUInt64BE(4) !== cookie) throw new Error('chunk for another request');
      const chunk = { flags: h.readUInt16BE(0), type: h.readUInt16BE(2), data: await this.read(h.readUInt32BE(12)) };
      chunks.push(chunk);
      if (chunk.flags & 1) return chunks;
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

function transmissionFlag(flags: number, bit: number): boolean {
  return (flags & (1 << bit)) !== 0;
}

// -------------------------------------------------------------------------------------------- tests

test('read-only: nbdinfo size and export list, nbdcopy and qemu-img byte-identical, holes in the map', async (t) => {
  requireTools('nbdinfo', 'nbdcopy', 'qemu-img');
  const f = await setup();
  const out = await tempDir(t);
  const srv = await startServer(t, f.repo, []);
  t.true(srv.listening.read_only);
  t.is(srv.listening.tls, null);
  // Every complete version under its id, plus each volume name (other tests may have added versions).
  const all = await runJson<VersionJson[]>(['ls', ...f.repo.args], { env: f.repo.env });
  const expectedNames = [...all.filter((v) => v.complete).map((v) => v.id), ...new Set(all.filter((v) => v.complete).map((v) => v.name))];
  t.deepEqual(srv.listening.exports.map((e) => e.name).sort(), expectedNames.sort());
  t.true(expectedNames.includes('disk') && expectedNames.includes(f.fs.id));

  const info = JSON.parse((await run('nbdinfo', ['--json', srv.uri(f.disk.id)])).stdout);
  t.is(info.exports[0]['export-size'], f.image.size);
  t.true(info.exports[0]['is_read_only']);
  t.is(JSON.parse((await run('nbdinfo', ['--json', srv.uri('disk')])).stdout).exports[0]['export-size'], f.image.size, 'volume name = newest version');
  t.is((await run('nbdinfo', ['--size', srv.uri(f.fs.id)])).stdout.trim(), String(32 * MiB));

  const list = (await run('nbdinfo', ['--list', `nbd+unix:///?socket=${srv.listening.socket}`])).stdout;
  for (const n of [f.disk.id, f.fs.id, 'disk', 'fs']) t.true(list.includes(`export="${n}"`), `--list shows ${n}:\n${list}`);

  const copy = path.join(out, 'copy.img');
  await run('nbdcopy', [srv.uri(f.disk.id), copy]);
  t.is(await sha256File(copy), f.image.sha256, 'nbdcopy: byte-identical');

  const converted = path.join(out, 'qemu.img');
  await run('qemu-img', ['convert', '-f', 'raw', srv.uri(f.disk.id), '-O', 'raw', converted]);
  // qemu's block layer rounds the size up to whole 512-byte sectors and reads the padding as zeros.
  const st = await fs.stat(converted);
  t.is(st.size, Math.ceil(f.image.size / 512) * 512);
  t.is(await sha256File(converted, { start: 0, length: f.image.size }), f.image.sha256, 'qemu-img convert: byte-identical');
  t.true((await readRange(converted, f.image.size, st.size - f.image.size)).every((b) => b === 0));

  // base:allocation: the two zero blocks (1 and 4) are holes reading as zeros, the rest data.
  const map = JSON.parse((await run('nbdinfo', ['--map', '--json', srv.uri(f.disk.id)])).stdout) as { offset: number; length: number; type: number }[];
  const bs = 4 * MiB;
  const holes = map.filter((e) => e.type === 3).map((e) => [e.offset, e.length]);
  t.deepEqual(holes, [
    [bs, bs],
    [4 * bs, bs],
  ]);
  t.is(
    map.reduce((n, e) => n + e.length, 0),
    f.image.size,
    'the map covers the export',
  );
  t.true(map.filter((e) => e.type === 0).every((e) => e.offset % bs === 0));

  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.deepEqual(
    stopped.events.map((e) => e.event),
    ['listening', 'stopped'],
  );
});

test('protocol details: option errors, EPERM on read-only writes, EINVAL out of range, structured reads and block status', async (t) => {
  const f = await setup();
  const srv = await startServer(t, f.repo, [f.disk.id]);
  const bs = 4 * MiB;

  const c = await RawClient.connect(srv.target);
  t.teardown(() => c.close());
  // NBD_OPT_LIST: every export with a description; unsupported options are refused, not fatal.
  const list = await c.option(NBD.OPT_LIST);
  const listed = list.filter((r) => r.type === NBD.REP_SERVER).map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString());
  t.deepEqual(listed.sort(), [f.disk.id, 'disk'].sort());
  // No --tls-psk: STARTTLS is refused by policy (NOTLS mode), not fatal.
  t.is((await c.option(NBD.OPT_STARTTLS)).pop()!.type, NBD.REP_ERR_POLICY);
  t.is((await c.option(NBD.OPT_LIST, Buffer.from('x'))).pop()!.type, NBD.REP_ERR_INVALID);
  // Meta contexts need structured replies first.
  t.is((await c.option(NBD.OPT_SET_META_CONTEXT, RawClient.metaData(f.disk.id, ['base:allocation']))).pop()!.type, NBD.REP_ERR_INVALID);
  t.is((await c.go('no-such-export')).pop()!.type, NBD.REP_ERR_UNKNOWN, 'unknown export: NBD_REP_ERR_UNKNOWN');
  const go = await c.go(f.disk.id);
  t.is(go.pop()!.type, NBD.REP_ACK);
  t.is(c.size, BigInt(f.image.size));
  t.true(transmissionFlag(c.flags, 1), 'NBD_FLAG_READ_ONLY');
  t.false(transmissionFlag(c.flags, 2), 'no flush on read-only');

  // Simple replies: a write is refused with EPERM (its payload consumed, the stream stays in sync).
  t.is((await c.simple(NBD.CMD_WRITE, 0, 4096, Buffer.alloc(4096, 1))).error, NBD.EPERM);
  t.is((await c.simple(NBD.CMD_TRIM, 0, 4096)).error, NBD.EPERM);
  t.is((await c.simple(NBD.CMD_WRITE_ZEROES, 0, 4096)).error, NBD.EPERM);
  t.is((await c.simple(NBD.CMD_READ, f.image.size - 10, 11)).error, NBD.EINVAL, 'read past the end');
  t.is((await c.simple(NBD.CMD_BLOCK_STATUS, 0, 4096)).error, NBD.EINVAL, 'block status without a context');
  const r = await c.simple(NBD.CMD_READ, bs - 100, 300); // crosses from data into a sparse block
  t.is(r.error, 0);
  t.deepEqual(r.data, await readRange(f.image.path, bs - 100, 300));
  const tail = await c.simple(NBD.CMD_READ, f.image.size - 1000, 1000);
  t.deepEqual(tail.data, await readRange(f.image.path, f.image.size - 1000, 1000));
  t.is((await c.simple(NBD.CMD_FLUSH, 0, 0)).error, 0);

  // Structured replies with base:allocation.
  const s = await RawClient.connect(srv.target);
  t.teardown(() => s.close());
  t.is((await s.option(NBD.OPT_STRUCTURED_REPLY)).pop()!.type, NBD.REP_ACK);
  const lm = await s.option(NBD.OPT_LIST_META_CONTEXT, RawClient.metaData(f.disk.id, []));
  t.deepEqual(
    lm.filter((x) => x.type === NBD.REP_META_CONTEXT).map((x) => x.data.subarray(4).toString()),
    ['base:allocation'],
  );
  const sm = await s.option(NBD.OPT_SET_META_CONTEXT, RawClient.metaData(f.disk.id, ['base:allocation', 'x-other:thing']));
  const ctx = sm.find((x) => x.type === NBD.REP_META_CONTEXT)!;
  t.is(ctx.data.subarray(4).toString(), 'base:allocation');
  const ctxId = ctx.data.readUInt32BE(0);
  t.is(sm.pop()!.type, NBD.REP_ACK);
  t.is((await s.go(f.disk.id)).pop()!.type, NBD.REP_ACK);

  const bstat = await s.structured(NBD.CMD_BLOCK_STATUS, bs - 4096, 2 * bs);
  t.is(bstat.length, 1);
  t.is(bstat[0]!.type, 5);
  t.is(bstat[0]!.data.readUInt32BE(0), ctxId);
  const ext: [number, number][] = [];
  for (let i = 4; i < bstat[0]!.data.length; i += 8) ext.push([bstat[0]!.data.readUInt32BE(i), bstat[0]!.data.readUInt32BE(i + 4)]);
  t.deepEqual(ext, [
    [4096, 0],
    [bs, 3],
    [bs - 4096, 0],
  ]);
  const one = await s.structured(NBD.CMD_BLOCK_STATUS, bs + 10, bs, 8 /* REQ_ONE */);
  t.is(one[0]!.data.length, 12, 'NBD_CMD_FLAG_REQ_ONE: one extent');

  // A read across data and a hole: OFFSET_DATA + OFFSET_HOLE chunks that reassemble to the image.
  const chunks = await s.structured(NBD.CMD_READ, bs - 8192, 16384);
  t.deepEqual(
    chunks.map((x) => x.type),
    [1, 2],
  );
  t.is(chunks[1]!.flags & 1, 1, 'last chunk has NBD_REPLY_FLAG_DONE');
  const assembled = Buffer.alloc(16384);
  for (const ch of chunks) {
    const at = Number(ch.data.readBigUInt64BE(0)) - (bs - 8192);
    if (ch.type === 1) ch.data.copy(assembled, at, 8);
  }
  t.deepEqual(assembled, await readRange(f.image.path, bs - 8192, 16384));
  const err = await s.structured(NBD.CMD_READ, f.image.size, 1);
  t.is(err[0]!.type, 32769, 'structured error chunk');
  t.is(err[0]!.data.readUInt32BE(0), NBD.EINVAL);

  // NBD_CMD_DISC: the server closes the connection.
  s.sendRequest(NBD.CMD_DISC, 0, 0);
  t.true(await s.closed());
  // NBD_OPT_ABORT is acknowledged; an unknown NBD_OPT_EXPORT_NAME ends the session.
  const a = await RawClient.connect(srv.target);
  t.teardown(() => a.close());
  t.is((await a.option(NBD.OPT_ABORT)).pop()!.type, NBD.REP_ACK);
  const e = await RawClient.connect(srv.target);
  t.teardown(() => e.close());
  e.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('nope'));
  t.true(await e.closed());

  t.is((await srv.stop()).code, 0);
});

test('many clients at once; clients vanishing mid-request do not disturb the others; the served version cannot be removed', async (t) => {
  requireTools('nbdcopy', 'qemu-io');
  const f = await setup();
  const out = await tempDir(t);
  // 12 + 3 × 2 + 4 connections at once: above the default cap of 16.
  const srv = await startServer(t, f.repo, ['--max-connections', '64', 'disk']);

  // rm of a served version: refused, exit code 4 (locked), even with --force.
  const rm = await runCli(['rm', ...f.repo.args, '--force', f.disk.id], { env: f.repo.env });
  t.is(rm.code, 4, rm.stderr);
  t.regex(rm.stderr, /lock/i);

  const rude = async () => {
    const c = await RawClient.connect(srv.target);
    await c.go('disk');
    for (let i = 0; i < 4; i++) c.sendRequest(NBD.CMD_READ, i * 4 * MiB, 8 * MiB);
    c.close(); // gone before the replies
  };
  const copies = [0, 1, 2].map(async (i) => {
    const file = path.join(out, `copy${i}.img`);
    await run('nbdcopy', ['--connections=2', srv.uri('disk'), file]);
    return sha256File(file);
  });
  const reads = [0, 1, 2, 3].map((i) => run('qemu-io', ['-f', 'raw', '-r', '-c', `read -v ${i * 4 * MiB + 1000} 16`, srv.uri(f.disk.id)]));
  await Promise.all([...Array.from({ length: 12 }, rude), ...reads]);
  for (const h of await Promise.all(copies)) t.is(h, f.image.sha256);
  // Still serving after all that.
  const again = path.join(out, 'again.img');
  await run('nbdcopy', [srv.uri('disk'), again]);
  t.is(await sha256File(again), f.image.sha256);
  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  // The lock is released with the server.
  t.is((await runCli(['show', ...f.repo.args, f.disk.id], { env: f.repo.env })).code, 0);
});

// The two --rw tests run serially (before the others): they check which block objects a run adds.
test.serial('--rw: writes go to an overlay visible to readers of the same server; the backup is unchanged after exit', async (t) => {
  requireTools('qemu-io', 'nbdcopy', 'nbdinfo');
  const f = await setup();
  const out = await tempDir(t);
  const objectsBefore = await listObjects(f.repo.dir);
  const srv = await startServer(t, f.repo, ['--rw', f.disk.id]);
  t.false(srv.listening.read_only);
  const bs = 4 * MiB;
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 65536 64k', '-c', `write -P 0xcd ${bs + 100} 10`, '-c', `write -z ${3 * bs} ${bs}`, srv.uri(f.disk.id)]);
  // Another client of the same server sees the writes (and the zeroing) on top of the backup.
  await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0xab 65536 64k', '-c', `read -P 0xcd ${bs + 100} 10`, '-c', `read -P 0 ${3 * bs} ${bs}`, srv.uri('disk')]);
  const merged = path.join(out, 'merged.img');
  await run('nbdcopy', [srv.uri(f.disk.id), merged]);
  const expected = await fs.readFile(f.image.path);
  expected.fill(0xab, 65536, 65536 + 65536);
  expected.fill(0xcd, bs + 100, bs + 110);
  expected.fill(0, 3 * bs, 4 * bs);
  t.true((await fs.readFile(merged)).equals(expected), 'reads merge overlay and backup');
  // The map follows: block 1 has a written granule now, block 3 reads as zeros.
  const map = JSON.parse((await run('nbdinfo', ['--map', '--json', srv.uri(f.disk.id)])).stdout) as { offset: number; length: number; type: number }[];
  t.true(
    map.some((e) => e.type === 0 && e.offset <= bs + 100 && e.offset + e.length > bs + 100),
    'written granule in a sparse block is data',
  );
  t.true(
    map.some((e) => e.type === 3 && e.offset <= 3 * bs && e.offset + e.length >= 4 * bs),
    'zeroed block is a hole',
  );

  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.deepEqual(
    stopped.events.map((e) => e.event),
    ['listening', 'stopped'],
    'nothing kept without --keep-as',
  );
  t.deepEqual(await listObjects(f.repo.dir), objectsBefore, 'no block objects added');
  const restored = path.join(out, 'restored.img');
  await runOk(['restore', ...f.repo.args, f.disk.id, restored], { env: f.repo.env });
  t.is(await sha256File(restored), f.image.sha256, 'the backup is unchanged');
  const overlays = (await fs.readdir(process.env.TMPDIR ?? '/tmp')).filter((n) => n.startsWith(`blocksafe-nbd-${f.disk.id}-${srv.proc.pid}-`));
  t.deepEqual(overlays, [], 'overlay file removed');
});

test.serial('--rw --keep-as: the overlay becomes a new protected version sharing the unchanged blocks', async (t) => {
  requireTools('qemu-io');
  const f = await setup();
  const out = await tempDir(t);
  const overlayDir = await tempDir(t);
  const srv = await startServer(t, f.repo, ['--rw', '--keep-as', 'disk-edited', '--overlay-dir', overlayDir, 'disk']);
  t.is((await fs.readdir(overlayDir)).length, 1, 'overlay file in --overlay-dir');
  const bs = 4 * MiB;
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${2 * bs + 4096} 8192`, '-c', `write -P 0x11 ${4 * bs} 512`, srv.uri('disk')]);
  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  const kept = stopped.events.find((e) => e.event === 'kept')?.version as VersionJson | undefined;
  if (!kept) return t.fail(`no kept version:\n${stopped.stdout}\n${stopped.stderr}`);
  t.deepEqual(await fs.readdir(overlayDir), [], 'overlay file removed');
  t.is(kept.name, 'disk-edited');
  t.true(kept.protected);
  t.true(kept.complete);
  t.is(kept.base, f.disk.id);
  t.is(kept.size, f.image.size);
  // Blocks 0, 3 (dup of 0) and the tail are untouched and shared; block 2 (written) and 4 (was zero) are new.
  t.like(kept.stats, { blocks_referenced: 3, blocks_read: 2, blocks_written: 2, blocks_sparse: 1 });
  const shown = await runJson<VersionJson>(['show', ...f.repo.args, kept.id], { env: f.repo.env });
  t.true(shown.protected);

  const restored = path.join(out, 'kept.img');
  await runOk(['restore', ...f.repo.args, kept.id, restored], { env: f.repo.env });
  const expected = await fs.readFile(f.image.path);
  expected.fill(0x5a, 2 * bs + 4096, 2 * bs + 4096 + 8192);
  expected.fill(0x11, 4 * bs, 4 * bs + 512);
  t.true((await fs.readFile(restored)).equals(expected), 'restore of the kept version contains the writes');
  const original = path.join(out, 'original.img');
  await runOk(['restore', ...f.repo.args, f.disk.id, original], { env: f.repo.env });
  t.is(await sha256File(original), f.image.sha256, 'the base version is unchanged');
  // Protected: rm refuses it without --force.
  t.is((await runCli(['rm', ...f.repo.args, kept.id], { env: f.repo.env })).code, 1);
});

test('nbdfuse → losetup → mount: files of an ext4 backup read back equal (over a Unix socket)', async (t) => {
  requireTools('nbdfuse', 'fusermount3', 'losetup');
  if (process.getuid?.() !== 0) return t.fail('this test needs root (losetup, mount)');
  const f = await setup();
  const dir = await tempDir(t);
  const socket = path.join(dir, 'nbd.sock');
  const srv = await startServer(t, f.repo, ['fs'], ['--socket', socket]);
  t.is(srv.listening.socket, socket);
  const fuseDir = path.join(dir, 'fuse');
  const mnt = path.join(dir, 'mnt');
  await fs.mkdir(fuseDir);
  await fs.mkdir(mnt);
  const pidFile = path.join(dir, 'nbdfuse.pid');
  const fuse = spawn('nbdfuse', ['-r', '-P', pidFile, path.join(fuseDir, 'disk'), srv.uri('fs')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let fuseErr = '';
  fuse.stderr!.on('data', (b: Buffer) => (fuseErr += b.toString()));
  const fuseExit = new Promise((r) => fuse.once('exit', r));
  let loop: string | null = null;
  let mounted = false;
  t.teardown(async () => {
    if (mounted) spawnSync('umount', [mnt]);
    if (loop) spawnSync('losetup', ['-d', loop]);
    spawnSync('fusermount3', ['-u', fuseDir]);
    await Promise.race([fuseExit, delay(3000)]);
    if (fuse.exitCode === null) fuse.kill('SIGKILL');
  });
  while (!(await fs.stat(pidFile).catch(() => null))) {
    if (fuse.exitCode !== null) return t.fail(`nbdfuse exited ${fuse.exitCode}: ${fuseErr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  const file = path.join(fuseDir, 'disk');
  t.is((await fs.stat(file)).size, 32 * MiB);
  loop = (await run('losetup', ['-r', '-f', '--show', file])).stdout.trim();
  await run('mount', ['-o', 'ro', loop, mnt]);
  mounted = true;
  for (const rel of ['docs/readme.txt', 'random.bin']) {
    t.is(await sha256File(path.join(mnt, rel)), await sha256File(path.join(f.fsSource, rel)), rel);
  }
  await run('umount', [mnt]);
  mounted = false;
  await run('losetup', ['-d', loop]);
  loop = null;
  await run('fusermount3', ['-u', fuseDir]);
  await fuseExit;
  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.false(
    await fs.stat(socket).then(
      () => true,
      () => false,
    ),
    'socket file removed',
  );
});

test('usage errors: --keep-as without --rw, several versions, unknown version, address in use', async (t) => {
  const f = await setup();
  const one = await runCli(['nbd', ...f.repo.args, '--keep-as', 'x', f.disk.id], { env: f.repo.env });
  t.is(one.code, 2);
  t.regex(one.stderr, /^blocksafe: --keep-as needs --rw/);
  const many = await runCli(['nbd', ...f.repo.args, '--rw', '--keep-as', 'x'], { env: f.repo.env });
  t.is(many.code, 2);
  t.regex(many.stderr, /exactly one VERSION/);
  const unknown = await runCli(['nbd', ...f.repo.args, 'zzzzzzzz'], { env: f.repo.env });
  t.is(unknown.code, 1);
  t.regex(unknown.stderr, /No version "zzzzzzzz"/);
  const bad = await runCli(['nbd', ...f.repo.args, '--tcp', 'localhost:99999', '--insecure-tcp'], { env: f.repo.env });
  t.is(bad.code, 2);
  const renamed = await runCli(['nbd', ...f.repo.args, '--listen', '127.0.0.1:10809'], { env: f.repo.env });
  t.is(renamed.code, 2);
  t.regex(renamed.stderr, /--listen was replaced by --tcp/);
  const srv = await startServer(t, f.repo, [f.disk.id], ['--tcp', '127.0.0.1:0', '--insecure-tcp']);
  const busy = await runCli(['nbd', ...f.repo.args, '--tcp', `127.0.0.1:${srv.port}`, '--insecure-tcp', f.disk.id], { env: f.repo.env });
  t.is(busy.code, 1);
  t.regex(busy.stderr, /^blocksafe: Cannot listen on 127\.0\.0\.1:\d+: the address is in use/);
  t.is((await srv.stop()).code, 0);
});

test('--rw overlay semantics: unaligned writes, zeroing and trims across granules and the short last granule match a model', async (t) => {
  const f = await setup();
  const srv = await startServer(t, f.repo, ['--rw', f.disk.id]);
  const c = await RawClient.connect(srv.target);
  t.teardown(() => c.close());
  t.is((await c.go(f.disk.id)).pop()!.type, NBD.REP_ACK);
  t.false(transmissionFlag(c.flags, 1), 'not read-only');
  for (const bit of [2, 3, 5, 6]) t.true(transmissionFlag(c.flags, bit), `flag bit ${bit} (flush, fua, trim, write zeroes)`);
  const model = await fs.readFile(f.image.path);
  const size = model.length;
  // Deterministic pseudo-random operations, biased towards granule and block edges and the end of the export.
  let seed = 12345;
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  const edges = [0, 4096, 4 * MiB, 8 * MiB, 12 * MiB, size - 4096, size - 1234, size - 1];
  for (let op = 0; op < 60; op++) {
    const base = edges[rnd(edges.length)]!;
    const offset = Math.min(size - 1, Math.max(0, base + rnd(9000) - 4500));
    const length = Math.min(size - offset, 1 + rnd(op % 5 === 0 ? 600_000 : 10_000));
    const kind = rnd(3);
    if (kind === 0) {
      const data = Buffer.alloc(length, 1 + rnd(250));
      t.is((await c.simple(NBD.CMD_WRITE, offset, length, data)).error, 0);
      data.copy(model, offset);
    } else {
      t.is((await c.simple(kind === 1 ? NBD.CMD_WRITE_ZEROES : NBD.CMD_TRIM, offset, length)).error, 0);
      model.fill(0, offset, offset + length);
    }
  }
  t.is((await c.simple(NBD.CMD_FLUSH, 0, 0)).error, 0);
  t.is((await c.simple(NBD.CMD_WRITE, size - 10, 11, Buffer.alloc(11))).error, NBD.EINVAL, 'write past the end');
  for (let pos = 0; pos < size; pos += 3 * MiB) {
    const len = Math.min(3 * MiB, size - pos);
    const r = await c.simple(NBD.CMD_READ, pos, len);
    t.true(r.data!.equals(model.subarray(pos, pos + len)), `content at ${pos}`);
  }
  t.is((await srv.stop()).code, 0);
});

test('a damaged block gives EIO for the reads that need it; the rest of the version and the server stay usable', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const image = await makeImage(path.join(dir, 'img'), { blocks: ['random', 'text', 'random'], blockSize: MiB, seed: 'damage' });
  const v = await runJson<VersionJson>(['backup', ...repo.args, image.path, 'vol'], { env: repo.env });
  // The text block compresses: its object is the smallest. Damage one byte of it.
  const objects = await listObjects(repo.dir);
  const sizes = await Promise.all(objects.map(async (o) => ({ o, size: (await fs.stat(path.join(repo.dir, o))).size })));
  const text = sizes.sort((a, b) => a.size - b.size)[0]!.o;
  const fh = await fs.open(path.join(repo.dir, text), 'r+');
  const byte = Buffer.alloc(1);
  await fh.read(byte, 0, 1, 100);
  await fh.write(Buffer.from([byte[0]! ^ 0x55]), 0, 1, 100);
  await fh.close();

  const srv = await startServer(t, repo, [v.id]);
  const c = await RawClient.connect(srv.target);
  t.teardown(() => c.close());
  t.is((await c.go(v.id)).pop()!.type, NBD.REP_ACK);
  t.is((await c.simple(NBD.CMD_READ, MiB + 10, 100)).error, 5, 'EIO for the damaged block');
  t.is((await c.simple(NBD.CMD_READ, MiB - 50, 100)).error, 5, 'EIO for a read that touches it');
  const first = await c.simple(NBD.CMD_READ, 0, MiB);
  t.is(first.error, 0);
  t.deepEqual(first.data, await readRange(image.path, 0, MiB));
  const last = await c.simple(NBD.CMD_READ, 2 * MiB, MiB);
  t.deepEqual(last.data, await readRange(image.path, 2 * MiB, MiB));
  const stopped = await srv.stop();
  t.is(stopped.code, 0);
  t.regex(stopped.stderr, /damaged/, 'the reason is logged');
});

// ------------------------------------------------------------------------------------ access control

const OTHER_USER = 'blocksafe-nbd-other';

/** An unprivileged local user to run clients as (created once; tests run as root). */
function otherUser(): string {
  requireTools('useradd', 'runuser');
  if (spawnSync('id', ['-u', OTHER_USER], { stdio: 'ignore' }).status !== 0) {
    const r = spawnSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', OTHER_USER], { encoding: 'utf8' });
    // Two test processes may race to create it.
    if (r.status !== 0 && spawnSync('id', ['-u', OTHER_USER], { stdio: 'ignore' }).status !== 0) throw new Error(`useradd failed: ${r.stderr}`);
  }
  return OTHER_USER;
}

function runAs(user: string, cmd: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return runStatus('runuser', ['-u', user, '--', cmd, ...args]);
}

test('default: a private Unix socket (0600 in a 0700 directory) that another local user cannot connect to; removed on exit', async (t) => {
  requireTools('nbdinfo', 'nbdcopy');
  if (process.getuid?.() !== 0) return t.fail('this test needs root (to run a client as another user)');
  const user = otherUser();
  const f = await setup();
  const out = await tempDir(t);
  const srv = await startServer(t, f.repo, ['--verbose', 'disk']);
  const socket = srv.listening.socket!;
  t.truthy(socket, 'listens on a Unix socket by default');
  t.is(srv.listening.address, null);
  const dir = path.dirname(socket);
  const dst = await fs.lstat(dir);
  const sst = await fs.lstat(socket);
  t.true(sst.isSocket());
  t.is(sst.mode & 0o777, 0o600, 'socket mode 0600');
  t.is(dst.mode & 0o777, 0o700, 'directory mode 0700');
  t.is(sst.uid, process.getuid!());
  t.is(dst.uid, process.getuid!());

  // The owner reads the backup…
  const copy = path.join(out, 'copy.img');
  await run('nbdcopy', ['--connections=1', srv.uri('disk'), copy]);
  t.is(await sha256File(copy), f.image.sha256);
  const connections = () => (srv.stderr().match(/connection from/g) ?? []).length;
  await until('the owner has disconnected', () => /disconnected/.test(srv.stderr()));
  const owners = connections();
  t.true(owners >= 1);
  // …another user gets nothing, not even the list of exports.
  const other = await runAs(user, 'nbdinfo', [srv.uri('disk')]);
  t.not(other.code, 0, `another user connected: ${other.stdout}`);
  t.regex(other.stderr, /Permission denied/);
  const otherList = await runAs(user, 'nbdinfo', ['--list', `nbd+unix:///?socket=${socket}`]);
  t.not(otherList.code, 0);
  t.regex(otherList.stderr, /Permission denied/);

  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.is(connections(), owners, 'the server never accepted a connection from the other user');
  t.false(
    await fs.lstat(socket).then(
      () => true,
      () => false,
    ),
    'socket removed',
  );
  t.false(
    await fs.lstat(dir).then(
      () => true,
      () => false,
    ),
    'private directory removed',
  );
});

test('--socket PATH in a directory others can enter: the socket is still 0600 and refuses another user', async (t) => {
  requireTools('nbdinfo');
  if (process.getuid?.() !== 0) return t.fail('this test needs root (to run a client as another user)');
  const user = otherUser();
  const f = await setup();
  const dir = await tempDir(t);
  await fs.chmod(dir, 0o755);
  const socket = path.join(dir, 'nbd.sock');
  const srv = await startServer(t, f.repo, ['disk'], ['--socket', socket]);
  t.is(srv.listening.socket, socket);
  t.is((await fs.lstat(socket)).mode & 0o777, 0o600);
  const other = await runAs(user, 'nbdinfo', ['--size', srv.uri('disk')]);
  t.not(other.code, 0);
  t.regex(other.stderr, /Permission denied/);
  t.is((await run('nbdinfo', ['--size', srv.uri('disk')])).stdout.trim(), String(f.image.size), 'the owner connects');
  t.is((await srv.stop()).code, 0);
});

test('TCP needs --tls-psk or an explicit --insecure-tcp; --insecure-tcp serves only under per-run secret names, unlisted', async (t) => {
  requireTools('nbdinfo', 'nbdcopy');
  const f = await setup();
  const out = await tempDir(t);
  const plain = await runCli(['nbd', ...f.repo.args, '--tcp', '127.0.0.1:0', 'disk'], { env: f.repo.env });
  t.is(plain.code, 2);
  t.regex(plain.stderr, /^blocksafe: TCP needs TLS: add --tls-psk FILE/);
  t.is((await runCli(['nbd', ...f.repo.args, '--insecure-tcp', 'disk'], { env: f.repo.env })).code, 2, '--insecure-tcp without --tcp');

  const srv = await startServer(t, f.repo, ['disk'], ['--tcp', '127.0.0.1:0', '--insecure-tcp']);
  t.true(srv.port > 0);
  t.true(srv.listening.secret_names);
  const names = srv.listening.exports.map((e) => e.name);
  const secret = names[0]!.split('/')[0]!;
  t.true(secret.length >= 22, 'at least 128 random bits');
  t.true(names.every((n) => n.startsWith(`${secret}/`)));
  // The printed URI works…
  const copy = path.join(out, 'copy.img');
  await run('nbdcopy', [srv.uri('disk'), copy]);
  t.is(await sha256File(copy), f.image.sha256);
  // …guessing does not: neither the plain names, nor the default export, nor a listing.
  for (const guess of ['disk', f.disk.id, '']) {
    const r = await runStatus('nbdinfo', [`nbd://127.0.0.1:${srv.port}/${guess}`]);
    t.not(r.code, 0, `export "${guess}" must not be served`);
  }
  const list = await runStatus('nbdinfo', ['--list', `nbd://127.0.0.1:${srv.port}/`]);
  t.not(list.code, 0);
  const c = await RawClient.connect(srv.target);
  t.teardown(() => c.close());
  const listed = await c.option(NBD.OPT_LIST);
  t.is(listed.length, 1, 'no export name leaks through NBD_OPT_LIST');
  t.is(listed[0]!.type, NBD.REP_ERR_POLICY);
  t.is((await srv.stop()).code, 0);
});

/** A psktool key file for `identity` (the format nbdkit --tls-psk and qemu's tls-creds-psk read). */
async function pskFile(dir: string, identity: string, name = 'keys.psk'): Promise<{ file: string; key: Buffer }> {
  requireTools('psktool');
  const file = path.join(dir, name);
  await run('psktool', ['-u', identity, '-p', file]);
  const line = (await fs.readFile(file, 'utf8'))
    .trim()
    .split('\n')
    .find((l) => l.startsWith(`${identity}:`))!;
  return { file, key: Buffer.from(line.slice(identity.length + 1), 'hex') };
}

test('TLS-PSK over TCP: nbdinfo and nbdcopy (nbds://) read byte-identical data; a wrong key, an unknown identity and a client without TLS get nothing', async (t) => {
  requireTools('nbdinfo', 'nbdcopy', 'psktool');
  const f = await setup();
  const dir = await tempDir(t);
  const { file, key } = await pskFile(dir, 'alice');
  const port = await freePort();
  const srv = await startServer(t, f.repo, ['disk'], ['--tcp', `127.0.0.1:${port}`, '--tls-psk', file, '--verbose']);
  t.is(srv.port, port, 'listens on the port given');
  t.is(srv.listening.tls, 'psk');
  t.deepEqual(srv.listening.tls_identities, ['alice']);
  const uri = srv.uri('disk');
  t.is(uri, `nbds://alice@127.0.0.1:${port}/disk?tls-psk-file=${file}`);

  const info = JSON.parse((await run('nbdinfo', ['--json', uri])).stdout);
  t.is(info.protocol, 'newstyle-fixed');
  t.true(info.TLS, 'nbdinfo reports TLS');
  t.is(info.exports[0]['export-size'], f.image.size);
  const copy = path.join(dir, 'copy.img');
  await run('nbdcopy', ['--connections=2', uri, copy]);
  t.is(await sha256File(copy), f.image.sha256, 'nbdcopy through TLS: byte-identical');
  t.regex(srv.stderr(), /TLS TLSv1\.3 \S+, PSK identity "alice"/);

  // A wrong key for the same identity.
  const wrong = await pskFile(dir, 'alice', 'wrong.psk');
  const w = await runStatus('nbdinfo', [uri.replace(file, wrong.file)]);
  t.not(w.code, 0);
  t.regex(w.stderr, /handshake|TLS/i);
  await until('the server logs the wrong key', () => /wrong key for PSK identity "alice"/.test(srv.stderr()));
  // An identity the server does not know.
  const bob = await pskFile(dir, 'bob', 'bob.psk');
  const b = await runStatus('nbdinfo', [uri.replace('alice@', 'bob@').replace(file, bob.file)]);
  t.not(b.code, 0);
  await until('the server logs the unknown identity', () => /unknown PSK identity "bob"/.test(srv.stderr()));
  // No TLS at all: every option but STARTTLS/ABORT is refused with NBD_REP_ERR_TLS_REQD, nothing leaks.
  const n = await runStatus('nbdinfo', [`nbd://127.0.0.1:${port}/disk`]);
  t.not(n.code, 0);
  const c = await RawClient.connect(srv.target);
  t.teardown(() => c.close());
  const list = await c.option(NBD.OPT_LIST);
  t.is(list.length, 1);
  t.is(list[0]!.type, NBD.REP_ERR_TLS_REQD);
  t.is((await c.go('disk')).pop()!.type, NBD.REP_ERR_TLS_REQD);
  // Then TLS with the right key (Node's client): the same connection works, and STARTTLS twice is invalid.
  await c.startTls('alice', key);
  t.is((await c.option(NBD.OPT_STARTTLS)).pop()!.type, NBD.REP_ERR_INVALID);
  t.is((await c.go('disk')).pop()!.type, NBD.REP_ACK);
  const r = await c.simple(NBD.CMD_READ, 4 * MiB - 100, 300);
  t.deepEqual(r.data, await readRange(f.image.path, 4 * MiB - 100, 300));
  // TLS 1.2 with ECDHE-PSK (forward secret) is accepted; TLS 1.2 with plain PSK (no forward secrecy) is not.
  const v12 = await RawClient.connect(srv.target);
  t.teardown(() => v12.close());
  const s12 = await v12.startTls('alice', key, { version: 'TLSv1.2', ciphers: 'ECDHE-PSK-CHACHA20-POLY1305' });
  t.is(s12.getProtocol(), 'TLSv1.2');
  t.is((await v12.go('disk')).pop()!.type, NBD.REP_ACK);
  t.is((await v12.simple(NBD.CMD_READ, 0, 4096)).error, 0);
  const plainPsk = await RawClient.connect(srv.target);
  t.teardown(() => plainPsk.close());
  await t.throwsAsync(plainPsk.startTls('alice', key, { version: 'TLSv1.2', ciphers: 'PSK-AES128-GCM-SHA256' }));
  // NBD_OPT_EXPORT_NAME without TLS ends the session.
  const e = await RawClient.connect(srv.target);
  t.teardown(() => e.close());
  e.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('disk'));
  t.true(await e.closed());
  t.is((await srv.stop()).code, 0);
});

test('TLS-PSK on the Unix socket (nbds+unix://): nbdcopy byte-identical; the key file may hold several identities', async (t) => {
  requireTools('nbdcopy', 'psktool');
  const f = await setup();
  const dir = await tempDir(t);
  const { file } = await pskFile(dir, 'alice');
  await run('psktool', ['-u', 'backup-host', '-p', file]);
  const srv = await startServer(t, f.repo, [f.fs.id], ['--tls-psk', file]);
  t.truthy(srv.listening.socket);
  t.deepEqual(srv.listening.tls_identities.sort(), ['alice', 'backup-host']);
  const uri = srv.uri(f.fs.id);
  t.true(uri.startsWith('nbds+unix://alice@/'), uri);
  for (const identity of ['alice', 'backup-host']) {
    const copy = path.join(dir, `${identity}.img`);
    await run('nbdcopy', [uri.replace('alice@', `${identity}@`), copy]);
    t.is(await sha256File(copy), await sha256File(f.fsImage), identity);
  }
  t.is((await srv.stop()).code, 0);
});

test('bad key files are refused with one line naming the file', async (t) => {
  const f = await setup();
  const dir = await tempDir(t);
  const cases: [string, RegExp][] = [
    ['alice:00112233', /keys\.psk:1: the key of "alice" has 32 bits; at least 128/],
    ['alice', /keys\.psk:1: expected IDENTITY:HEXKEY/],
    ['alice:zz00112233445566778899aabbccddeeff', /keys\.psk:1: the key is not hexadecimal/],
    ['# only a comment', /holds no key/],
  ];
  for (const [text, re] of cases) {
    await fs.writeFile(path.join(dir, 'keys.psk'), text + '\n', { mode: 0o600 });
    const r = await runCli(['nbd', ...f.repo.args, '--tls-psk', path.join(dir, 'keys.psk'), 'disk'], { env: f.repo.env });
    t.is(r.code, 2, text);
    t.regex(r.stderr, re);
    t.is(r.stderr.trim().split('\n').length, 1);
  }
});

// ----------------------------------------------------------------------------- resource limits

/** Opens a connection and selects `name` (simple replies). */
async function goRaw(target: string | number, name: string): Promise<RawClient> {
  const c = await RawClient.connect(target);
  const r = await c.go(name);
  if (r.pop()!.type !== NBD.REP_ACK) throw new Error(`NBD_OPT_GO ${name} failed`);
  return c;
}

test('read-only: WRITE and TRIM are refused with EPERM before the payload is read; a flood of stalled 32 MiB writes keeps memory bounded', async (t) => {
  const f = await setup();
  const srv = await startServer(t, f.repo, ['disk']);
  const clients: RawClient[] = [];
  t.teardown(() => clients.forEach((c) => c.close()));
  const N = 10;
  const LEN = 32 * MiB;
  // Warm up (the export's map and the pipeline), then measure.
  const warm = await goRaw(srv.target, 'disk');
  clients.push(warm);
  t.is((await warm.simple(NBD.CMD_READ, 0, MiB)).error, 0);
  const before = rssBytes(srv.pid);

  for (let i = 0; i < N; i++) {
    const c = await goRaw(srv.target, 'disk');
    clients.push(c);
    // The header of a 32 MiB write, and not one byte of its payload: the EPERM reply comes anyway.
    const cookie = c.sendRequest(NBD.CMD_WRITE, 0, LEN);
    const h = await c.read(16);
    t.is(h.readUInt32BE(0), 0x67446698);
    t.is(h.readUInt32BE(4), NBD.EPERM, 'EPERM without the payload');
    t.is(h.readBigUInt64BE(8), cookie);
    // Now 31 MiB of the payload, and then the client stalls. The write callback means the kernel took it
    // all: the server has read (and dropped) all but what the socket buffers hold.
    await new Promise<void>((resolve, reject) => c.socket.write(Buffer.alloc(LEN - MiB, 0x5a), (err) => (err ? reject(err) : resolve())));
  }
  // A TRIM, too, without reading anything further.
  t.is((await warm.simple(NBD.CMD_TRIM, 0, 4096)).error, NBD.EPERM);
  const after = rssBytes(srv.pid);
  const grown = after - before;
  t.log(`server RSS ${(before / MiB).toFixed(0)} MiB before, ${(after / MiB).toFixed(0)} MiB after ${N} stalled ${LEN / MiB} MiB writes`);
  // Buffering the payloads would add N × 31 MiB = 310 MiB; dropped in pieces they leave at most garbage.
  t.true(grown < 96 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB`);
  // The server still answers, and the stalled clients are still connected (their stream is in sync).
  t.is((await warm.simple(NBD.CMD_READ, 0, 4096)).error, 0);
  t.true(clients.every((c) => !c.socket.destroyed));
  t.is((await srv.stop()).code, 0);
});

test('request sizes: a READ above 32 MiB gets EINVAL (nothing allocated), a WRITE above it ends the connection', async (t) => {
  const f = await setup();
  const srv = await startServer(t, f.repo, ['--rw', 'disk']);
  const c = await goRaw(srv.target, 'disk');
  t.teardown(() => c.close());
  t.is((await c.simple(NBD.CMD_READ, 0, 32 * MiB + 1)).error, NBD.EINVAL);
  t.is((await c.simple(NBD.CMD_READ, 0, 0xffffffff)).error, NBD.EINVAL);
  t.is((await c.simple(NBD.CMD_READ, 0, 4096)).error, 0, 'the connection stays usable');
  c.sendRequest(NBD.CMD_WRITE, 0, 0xffffffff);
  t.true(await c.closed(), 'hard disconnect on an oversized write');
  await until('the violation is logged', () => /write of 4294967295 bytes, more than the maximum payload/.test(srv.stderr()));
  // Other clients are unaffected.
  const d = await goRaw(srv.target, 'disk');
  t.teardown(() => d.close());
  t.is((await d.simple(NBD.CMD_READ, 0, 4096)).error, 0);
  t.is((await srv.stop()).code, 0);
});

test('--max-connections: one connection too many is closed at once and logged; a freed slot is usable again', async (t) => {
  const f = await setup();
  const limited = await startServer(t, f.repo, ['--max-connections', '2', 'disk']);
  t.is(limited.listening.max_connections, 2);
  const a = await goRaw(limited.target, 'disk');
  const b = await RawClient.connect(limited.target); // still in the handshake: it counts too
  t.teardown(() => [a, b].forEach((c) => c.close()));
  const third = await RawClient.open(limited.target);
  t.teardown(() => third.close());
  await t.throwsAsync(third.read(18), { message: /closed by the server/ }, 'no greeting for the third');
  t.regex(limited.stderr(), /refused: 2 connections are open, the maximum \(max_connections = 2\)/);
  t.is((await a.simple(NBD.CMD_READ, 0, 4096)).error, 0, 'the others are unaffected');
  b.close();
  // Once the server has noticed, a new connection is accepted (retried until then: no fixed wait).
  let fourth: RawClient | null = null;
  await until('a slot frees up', async () => {
    try {
      fourth = await RawClient.connect(limited.target);
      return true;
    } catch {
      return false;
    }
  });
  t.teardown(() => fourth?.close());
  t.is((await fourth!.go('disk')).pop()!.type, NBD.REP_ACK);
  t.is((await limited.stop()).code, 0);
});

test('--handshake-timeout: a client that connects and stalls (in plain NBD or in the TLS handshake) is disconnected and logged', async (t) => {
  requireTools('psktool');
  const f = await setup();
  const dir = await tempDir(t);
  const { file } = await pskFile(dir, 'alice');
  const srv = await startServer(t, f.repo, ['--handshake-timeout', '300ms', '--tls-psk', file, 'disk']);
  // Connects, reads the greeting, sends nothing.
  const silent = await RawClient.open(srv.target);
  t.teardown(() => silent.close());
  t.true(await silent.closed(), 'a silent client is disconnected');
  // Sends STARTTLS and then never starts the TLS handshake. (On a loaded machine the 300 ms may run out
  // before the ACK arrives; such attempts are repeated, so that the test does not depend on speed.)
  let acked = 0;
  for (let attempt = 0; attempt < 20 && acked === 0; attempt++) {
    const halfTls = await RawClient.connect(srv.target);
    t.teardown(() => halfTls.close());
    const reply = await halfTls.option(NBD.OPT_STARTTLS).catch(() => null);
    if (reply?.pop()!.type === NBD.REP_ACK) acked++;
    t.true(await halfTls.closed(), 'a half-open TLS handshake is disconnected');
  }
  t.is(acked, 1, 'STARTTLS was acknowledged, then the connection closed for want of a TLS handshake');
  await until('both are logged', () => (srv.stderr().match(/handshake not completed within 0\.3 s \(handshake_timeout\)/g) ?? []).length >= 2);
  t.is((await srv.stop()).code, 0);
});

test('--idle-timeout and --stall-timeout: idle clients, writes stalled mid-payload and clients that stop reading replies are disconnected', async (t) => {
  const f = await setup();
  const idle = await startServer(t, f.repo, ['--idle-timeout', '300ms', 'disk']);
  const c = await goRaw(idle.target, 'disk');
  t.teardown(() => c.close());
  t.true(await c.closed());
  await until('idle logged', () => /idle for 0\.3 s \(idle_timeout\); connection closed/.test(idle.stderr()));
  t.is((await idle.stop()).code, 0);

  const stall = await startServer(t, f.repo, ['--stall-timeout', '300ms', 'disk']);
  // A write (to the read-only export) whose payload stops after 1000 bytes: EPERM at once, then cut off.
  const w = await goRaw(stall.target, 'disk');
  t.teardown(() => w.close());
  w.sendRequest(NBD.CMD_WRITE, 0, MiB);
  t.is((await w.read(16)).readUInt32BE(4), NBD.EPERM);
  w.socket.write(Buffer.alloc(1000));
  t.true(await w.closed());
  await until('stall logged', () => /stopped sending in the middle of a request for 0\.3 s; connection closed/.test(stall.stderr()));
  // A client that asks for 160 MiB and reads none of it.
  const r = await goRaw(stall.target, 'disk');
  t.teardown(() => r.close());
  r.socket.pause();
  for (let i = 0; i < 40; i++) r.sendRequest(NBD.CMD_READ, 0, 4 * MiB);
  await until('not-reading logged', () => /stopped reading replies for 0\.3 s \(stall_timeout\)/.test(stall.stderr()));
  t.is((await stall.stop()).code, 0);
});

test('--rw with request_memory at its 32M minimum: nbdcopy writing 32 MiB requests over 4 connections waits for the budget, nothing is lost', async (t) => {
  requireTools('nbdcopy');
  const f = await setup();
  const dir = await tempDir(t);
  const conf = path.join(dir, 'appliance.conf');
  await fs.writeFile(conf, '[nbd]\nrequest_memory = 32M\n');
  const tooSmall = path.join(dir, 'small.conf');
  await fs.writeFile(tooSmall, '[nbd]\nrequest_memory = 16M\n');
  const refused = await runCli(['nbd', ...f.repo.args, '--config', tooSmall, 'disk'], { env: f.repo.env });
  t.is(refused.code, 2);
  t.regex(refused.stderr, /request_memory must be at least 32M/);

  // 96 MiB: three 32 MiB writes in flight at once would need three times the budget.
  const image = await makeImage(path.join(dir, 'big.img'), { blocks: Array.from({ length: 24 }, (_, i) => (i % 3 === 0 ? 'zero' : 'random')), seed: 'budget' });
  // Its own repository: the shared one is listed by concurrent tests.
  const repo = await initKeyFileRepo(path.join(dir, 'repo'));
  const v = await runJson<VersionJson>(['backup', ...repo.args, image.path, 'budget'], { env: repo.env });
  const srv = await startServer(t, repo, ['--config', conf, '--rw', v.id]);
  // New content for the whole export: the image with every byte inverted.
  const source = path.join(dir, 'inverted.img');
  const data = await fs.readFile(image.path);
  for (let i = 0; i < data.length; i++) data[i] = ~data[i]! & 0xff;
  await fs.writeFile(source, data);
  await run('nbdcopy', ['--connections=4', '--requests=8', '--request-size=33554432', '--flush', source, srv.uri(v.id)]);
  const back = path.join(dir, 'back.img');
  await run('nbdcopy', ['--connections=4', '--request-size=33554432', srv.uri(v.id), back]);
  t.is(await sha256File(back), await sha256File(source), 'every write arrived, in the right place');
  t.is((await srv.stop()).code, 0);
});
