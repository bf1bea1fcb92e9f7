/**
 * `blocksafe nbd` against real NBD clients from Debian (libnbd-bin: nbdinfo, nbdcopy, nbdfuse; qemu-utils:
 * qemu-img, qemu-io) and a small raw protocol client for the error cases no client tool exposes. Every test
 * runs the real CLI as a child process and stops it with SIGINT, as a user would.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import * as fs from 'node:fs/promises';
import * as net from 'node:net';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import {
  BIN,
  initKeyFileRepo,
  listObjects,
  makeImage,
  MiB,
  readRange,
  ROOT,
  run,
  runCli,
  runJson,
  runOk,
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

interface Server {
  proc: ChildProcess;
  port: number;
  listening: { address: string | null; socket: string | null; read_only: boolean; exports: { name: string; version: string; size: number; alias: boolean; uri: string }[] };
  uri: (name: string) => string;
  /** SIGINT, then the exit code and all output. */
  stop: () => Promise<{ code: number | null; stdout: string; stderr: string; events: any[] }>;
  stderr: () => string;
}

function cliEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BLOCKSAFE_') && !k.startsWith('NODE_OPTIONS')) env[k] = v;
  return { ...env, ...extra };
}

/** Starts `blocksafe nbd --json` and waits until it listens (its first JSON line). Stopped at teardown. */
async function startServer(t: ExecutionContext, repo: RepoFixture, args: string[], listen: string[] = ['--listen', '127.0.0.1:0']): Promise<Server> {
  const proc = spawn(process.execPath, [BIN, 'nbd', ...repo.args, ...listen, '--json', ...args], { cwd: ROOT, env: cliEnv(repo.env), stdio: ['ignore', 'pipe', 'pipe'] });
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
  const deadline = Date.now() + 20_000;
  while (!stdout.includes('\n')) {
    if (proc.exitCode !== null) throw new Error(`blocksafe nbd exited ${proc.exitCode} before listening:\n${stderr}`);
    if (Date.now() > deadline) throw new Error(`blocksafe nbd did not start listening within 20 s:\n${stderr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  const listening = JSON.parse(stdout.split('\n')[0]!);
  if (listening.event !== 'listening') throw new Error(`unexpected first line: ${stdout}`);
  const port = listening.address ? Number(listening.address.split(':').pop()) : 0;
  return {
    proc,
    port,
    listening,
    uri: (name) => (listening.socket ? `nbd+unix:///${name}?socket=${listening.socket}` : `nbd://127.0.0.1:${port}/${name}`),
    stderr: () => stderr,
    stop: async () => {
      stopped = true;
      proc.kill('SIGINT');
      const code = await Promise.race([exited, delay(20_000).then(() => 'timeout' as const)]);
      if (code === 'timeout') {
        proc.kill('SIGKILL');
        throw new Error(`blocksafe nbd did not stop within 20 s after SIGINT:\n${stderr}`);
      }
      const events = stdout.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
      return { code, stdout, stderr, events };
    },
  };
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

  private constructor(readonly socket: net.Socket) {
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

  static async connect(port: number): Promise<RawClient> {
    const socket = net.connect(port, '127.0.0.1');
    await once(socket, 'connect');
    const c = new RawClient(socket);
    const hello = await c.read(18);
    if (hello.subarray(0, 8).toString() !== 'NBDMAGIC' || hello.readBigUInt64BE(8) !== NBD.IHAVEOPT) throw new Error('bad server greeting');
    if ((hello.readUInt16BE(16) & 3) !== 3) throw new Error('server lacks FIXED_NEWSTYLE|NO_ZEROES');
    socket.write(Buffer.from([0, 0, 0, 3]));
    return c;
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

  /** True when the server closes the connection within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.ended && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
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
  const port = await freePort();
  const srv = await startServer(t, f.repo, [], ['--listen', `127.0.0.1:${port}`]);
  t.is(srv.port, port, 'listens on the port given');
  t.true(srv.listening.read_only);
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

  const list = (await run('nbdinfo', ['--list', `nbd://127.0.0.1:${port}`])).stdout;
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
  t.is(map.reduce((n, e) => n + e.length, 0), f.image.size, 'the map covers the export');
  t.true(map.filter((e) => e.type === 0).every((e) => e.offset % bs === 0));

  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.deepEqual(stopped.events.map((e) => e.event), ['listening', 'stopped']);
});

test('protocol details: option errors, EPERM on read-only writes, EINVAL out of range, structured reads and block status', async (t) => {
  const f = await setup();
  const srv = await startServer(t, f.repo, [f.disk.id]);
  const bs = 4 * MiB;

  const c = await RawClient.connect(srv.port);
  t.teardown(() => c.close());
  // NBD_OPT_LIST: every export with a description; unsupported options are refused, not fatal.
  const list = await c.option(NBD.OPT_LIST);
  const listed = list.filter((r) => r.type === NBD.REP_SERVER).map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString());
  t.deepEqual(listed.sort(), [f.disk.id, 'disk'].sort());
  t.is((await c.option(NBD.OPT_STARTTLS)).pop()!.type, NBD.REP_ERR_UNSUP);
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
  const s = await RawClient.connect(srv.port);
  t.teardown(() => s.close());
  t.is((await s.option(NBD.OPT_STRUCTURED_REPLY)).pop()!.type, NBD.REP_ACK);
  const lm = await s.option(NBD.OPT_LIST_META_CONTEXT, RawClient.metaData(f.disk.id, []));
  t.deepEqual(lm.filter((x) => x.type === NBD.REP_META_CONTEXT).map((x) => x.data.subarray(4).toString()), ['base:allocation']);
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
  t.true(await s.closedWithin(3000));
  // NBD_OPT_ABORT is acknowledged; an unknown NBD_OPT_EXPORT_NAME ends the session.
  const a = await RawClient.connect(srv.port);
  t.teardown(() => a.close());
  t.is((await a.option(NBD.OPT_ABORT)).pop()!.type, NBD.REP_ACK);
  const e = await RawClient.connect(srv.port);
  t.teardown(() => e.close());
  e.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('nope'));
  t.true(await e.closedWithin(3000));

  t.is((await srv.stop()).code, 0);
});

test('many clients at once; clients vanishing mid-request do not disturb the others; the served version cannot be removed', async (t) => {
  requireTools('nbdcopy', 'qemu-io');
  const f = await setup();
  const out = await tempDir(t);
  const srv = await startServer(t, f.repo, ['disk']);

  // rm of a served version: refused, exit code 4 (locked), even with --force.
  const rm = await runCli(['rm', ...f.repo.args, '--force', f.disk.id], { env: f.repo.env });
  t.is(rm.code, 4, rm.stderr);
  t.regex(rm.stderr, /lock/i);

  const rude = async () => {
    const c = await RawClient.connect(srv.port);
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
  t.true(map.some((e) => e.type === 0 && e.offset <= bs + 100 && e.offset + e.length > bs + 100), 'written granule in a sparse block is data');
  t.true(map.some((e) => e.type === 3 && e.offset <= 3 * bs && e.offset + e.length >= 4 * bs), 'zeroed block is a hole');

  const stopped = await srv.stop();
  t.is(stopped.code, 0, stopped.stderr);
  t.deepEqual(stopped.events.map((e) => e.event), ['listening', 'stopped'], 'nothing kept without --keep-as');
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
  const deadline = Date.now() + 10_000;
  while (!(await fs.stat(pidFile).catch(() => null))) {
    if (fuse.exitCode !== null) return t.fail(`nbdfuse exited ${fuse.exitCode}: ${fuseErr}`);
    if (Date.now() > deadline) return t.fail(`nbdfuse did not start: ${fuseErr}`);
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
  t.false(await fs.stat(socket).then(() => true, () => false), 'socket file removed');
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
  const bad = await runCli(['nbd', ...f.repo.args, '--listen', 'localhost:99999'], { env: f.repo.env });
  t.is(bad.code, 2);
  const srv = await startServer(t, f.repo, [f.disk.id]);
  const busy = await runCli(['nbd', ...f.repo.args, '--listen', `127.0.0.1:${srv.port}`, f.disk.id], { env: f.repo.env });
  t.is(busy.code, 1);
  t.regex(busy.stderr, /^blocksafe: Cannot listen on 127\.0\.0\.1:\d+: the address is in use/);
  t.is((await srv.stop()).code, 0);
});

test('--rw overlay semantics: unaligned writes, zeroing and trims across granules and the short last granule match a model', async (t) => {
  const f = await setup();
  const srv = await startServer(t, f.repo, ['--rw', f.disk.id]);
  const c = await RawClient.connect(srv.port);
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
  const c = await RawClient.connect(srv.port);
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
