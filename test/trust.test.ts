/**
 * Issue 14 ("Trust: authenticated metadata, contained paths, and nothing an attacker's input can
 * exhaust"): one test per reproduced item, driving the real CLI against a repository someone else edited.
 * Items 4 (addon cache swap race) and 5 (NBD access and floods) are in test/binary.test.ts and
 * test/nbd.test.ts; the zstd bomb of item 8 in test/codec.test.ts.
 *
 * Against the code before the safety work (6a6f782: this file and test/helpers.ts, test/cliHarness.ts
 * copied into a build of it, with a node:zlib shim for its zstd-napi dependency), every test here fails —
 * see OLD_CODE below the imports for what each one met there.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { open as openLmdb } from 'lmdb';
import {
  assertCliError,
  backupJson,
  listFiles,
  makeImage,
  MiB,
  PASSPHRASE,
  prngBytes,
  runCli,
  runJson,
  runOk,
  sha256File,
  tempDir,
  type CliResult,
  type RepoFixture,
  type VersionJson,
} from './helpers.js';

/*
 * OLD_CODE — all 12 tests fail on 6a6f782 (`npx ava test/trust.test.ts` in a build of it, 2026-12-03); what
 * each met first, and what a manual run of the same step showed:
 *   1 downgrade ......... backup with the passphrase into the edited repository exits 0, "wrote 1.01 MiB":
 *                         the new data is stored in clear.
 *   2 edited index ...... restore of the swapped block map exits 0, "every block verified" (halves swapped).
 *   3 traversal ......... import of an export naming version "../../victim" exits 0 ("Imported version
 *                         ../../victim") and overwrites the file outside the repository with an object;
 *                         DirectoryStore.put("../outside") succeeds.
 *   6 rollback .......... an old attributes object put back goes unnoticed (no report); after index rebuild
 *                         the version is unprotected.
 *   7 key rotation ...... `rekey --master` does not exist (exit 2); `rekey`, `key passwd` keep the master key.
 *   8 limits ............ new slots use N=2^15, p=1; a slot edited to N=2^20 makes `ls` take 20.9 s and
 *                         1.1 GB RSS (/usr/bin/time) before "Wrong passphrase" (exit 1); a truncated slot is
 *                         "unexpected error: Unexpected end of JSON input … please report it".
 *   9 file modes ........ index directory 0755 (files 0644); no warning for readable secret files;
 *                         createCommandRunner passes BLOCKSAFE_PASSPHRASE to lvm.
 *  10 formats ........... index rebuild accepts a manifest with manifest_format 2 (exit 0).
 */

// ------------------------------------------------------------------------------------------- fixtures

interface Isolated {
  dir: string;
  /** A configuration whose state_dir (trust records) belongs to this test alone. */
  conf: string;
  stateDir: string;
}

/** A temporary directory with its own configuration: trust records of other tests or runs never interfere. */
async function isolated(t: ExecutionContext, stateName = 'state'): Promise<Isolated> {
  const dir = await tempDir(t, 'blocksafe-trust-');
  return { dir, ...(await confWithState(dir, stateName)) };
}

async function confWithState(dir: string, stateName: string): Promise<{ conf: string; stateDir: string }> {
  const stateDir = path.join(dir, stateName);
  const conf = path.join(dir, `${stateName}.conf`);
  await fs.writeFile(conf, `[s3]\nstate_dir = ${stateDir}\n`, { mode: 0o600 });
  return { conf, stateDir };
}

/** A key-file repository (cheap to open) in `iso`, using its configuration. */
async function keyFileRepo(iso: Isolated, name = 'repo', extra: string[] = []): Promise<RepoFixture & { keyFile: string }> {
  const dir = path.join(iso.dir, name);
  const keyFile = `${dir}.key`;
  await fs.writeFile(keyFile, randomBytes(64), { mode: 0o600 });
  const args = ['--config', iso.conf, '--repo', dir, '--key-file', keyFile];
  await runOk(['init', ...args, ...extra]);
  return { dir, args, env: {}, keyFile };
}

async function plainRepo(iso: Isolated, name = 'repo'): Promise<RepoFixture> {
  const dir = path.join(iso.dir, name);
  const args = ['--config', iso.conf, '--repo', dir];
  await runOk(['init', ...args, '--encryption', 'none']);
  return { dir, args, env: {} };
}

async function passphraseRepo(iso: Isolated, name = 'repo'): Promise<RepoFixture> {
  const dir = path.join(iso.dir, name);
  const args = ['--config', iso.conf, '--repo', dir];
  const env = { BLOCKSAFE_PASSPHRASE: PASSPHRASE };
  await runOk(['init', ...args], { env });
  return { dir, args, env };
}

/** Six distinct, incompressible 1 MiB blocks (no duplicates, no zeros): any swap or hole changes the bytes. */
function distinctImage(dir: string, seed: string) {
  return makeImage(path.join(dir, `${seed}.img`), { blocks: ['random', 'random', 'random', 'random', 'random', 'random'], blockSize: MiB, seed });
}

/** Every file of a repository except its LMDB index, with its content. */
async function storeFiles(repoDir: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const f of await listFiles(repoDir)) if (!f.startsWith('index/')) out.set(f, await fs.readFile(path.join(repoDir, f)));
  return out;
}

/** Asserts the store (everything but the index) is byte for byte what it was. */
async function assertStoreUnchanged(t: ExecutionContext, repoDir: string, before: Map<string, Buffer>, what: string): Promise<void> {
  const after = await storeFiles(repoDir);
  t.deepEqual([...after.keys()], [...before.keys()], `${what}: the same files in the store`);
  for (const [f, b] of before) t.true(after.get(f)?.equals(b), `${what}: ${f} unchanged`);
}

const refused = (t: ExecutionContext, r: CliResult, code: number, pattern: RegExp) => assertCliError(t, r, code, pattern);

// ------------------------------------------------------------------------------------ 1. downgrade

test('1. downgrade: a descriptor edited to "encryption: none" with a plaintext keyring is refused (exit 3) when slots exist, a passphrase or key file is given, or this machine saw it encrypted; nothing plaintext reaches the store', async (t) => {
  const iso = await isolated(t);
  const repo = await passphraseRepo(iso);
  const first = await distinctImage(iso.dir, 'first');
  await backupJson(repo, first.path, 'vol');
  // The new data: incompressible blocks that carry a marker an attacker would look for.
  const MARKER = Buffer.from(`SECRET-MARKER-${randomBytes(8).toString('hex')}-`);
  const secret = Buffer.concat([prngBytes('downgrade', 'a', MiB - 4096), Buffer.concat(Array.from({ length: 4096 / MARKER.length + 1 }, () => MARKER)).subarray(0, 4096)]);
  const source = path.join(iso.dir, 'secret.img');
  await fs.writeFile(source, Buffer.concat([secret, secret.subarray(0, 12345)]));

  // The attacker's plaintext keyring: the shape of a real unencrypted repository's, bound to this
  // repository's (edited) descriptor, with a MAC key of their choosing.
  const scratch = await plainRepo(await isolated(t), 'scratch');
  const descriptor = JSON.parse(await fs.readFile(path.join(repo.dir, 'blocksafe.json'), 'utf8')) as Record<string, unknown>;
  const edited: Record<string, unknown> = { ...descriptor, encryption: 'none', compression: 'none' };
  const keyring = JSON.parse(await fs.readFile(path.join(scratch.dir, 'keys', 'keyring'), 'utf8')) as Record<string, unknown>;
  if (keyring.repository) keyring.repository = { id: edited.id, encryption: 'none', block_size: edited.block_size, compression: 'none', compression_level: edited.compression_level };
  await fs.writeFile(path.join(repo.dir, 'blocksafe.json'), JSON.stringify(edited));
  await fs.writeFile(path.join(repo.dir, 'keys', 'keyring'), JSON.stringify(keyring));

  const slots = (await fs.readdir(path.join(repo.dir, 'keys'))).filter((f) => f.startsWith('slot-'));
  t.true(slots.length > 0);
  const keyFile = path.join(iso.dir, 'some.key');
  await fs.writeFile(keyFile, randomBytes(64), { mode: 0o600 });
  const fresh = await confWithState(iso.dir, 'fresh-state'); // a machine without a trust record
  const noSecretArgs = ['--config', fresh.conf, '--repo', repo.dir];
  const attempts: Array<[string, () => Promise<CliResult>, RegExp]> = [
    ['slots left in place, passphrase given', () => runCli(['backup', ...noSecretArgs, source, 'vol'], { env: repo.env }), /encryption: none.*key slots|downgrade/],
  ];
  const before = await storeFiles(repo.dir);
  for (const [what, attempt, message] of attempts) {
    refused(t, await attempt(), 3, message);
    await assertStoreUnchanged(t, repo.dir, before, what);
  }
  // Without the slots, the secret given on purpose still says the repository is encrypted.
  for (const s of slots) await fs.rm(path.join(repo.dir, 'keys', s));
  const withoutSlots = await storeFiles(repo.dir);
  const more: Array<[string, () => Promise<CliResult>, RegExp]> = [
    ['slots deleted, passphrase given', () => runCli(['backup', ...noSecretArgs, source, 'vol'], { env: repo.env }), /passphrase or key file was given|downgrade/],
    ['slots deleted, key file given', () => runCli(['backup', ...noSecretArgs, '--key-file', keyFile, source, 'vol']), /passphrase or key file was given|downgrade/],
    // No secret at all: this machine's trust record remembers the repository encrypted.
    ['slots deleted, no secret, this machine saw it encrypted', () => runCli(['backup', ...repo.args, source, 'vol']), /was encrypted when this machine last opened it/],
  ];
  for (const [what, attempt, message] of more) {
    refused(t, await attempt(), 3, message);
    await assertStoreUnchanged(t, repo.dir, withoutSlots, what);
  }
  // Whatever happened, no object in the repository holds the marker in clear.
  for (const [f, b] of await storeFiles(repo.dir)) t.is(b.indexOf(MARKER), -1, `${f} holds the plaintext marker`);
});

// -------------------------------------------------------------------------------- 2. edited index

/** Opens a repository's LMDB index the way an attacker with the disk would, runs `fn`, closes it. */
async function withIndex<T>(repoDir: string, fn: (root: ReturnType<typeof openLmdb>) => T): Promise<T> {
  const root = openLmdb({ path: path.join(repoDir, 'index', 'index.mdb'), maxDbs: 16, compression: false });
  try {
    return fn(root);
  } finally {
    await root.close();
  }
}

function mapKey(versionId: string, chunk: number): Buffer {
  const key = Buffer.alloc(versionId.length + 5);
  key.write(versionId, 0, 'ascii');
  key.writeUInt32BE(chunk, versionId.length + 1);
  return key;
}

/** Edits the first chunk of a version's block map: 32-byte checksums, after a 16-byte MAC in schema 3. */
async function editMap(repoDir: string, versionId: string, edit: (entry: (i: number) => Buffer) => void): Promise<void> {
  await withIndex(repoDir, (root) => {
    const maps = root.openDB<Buffer, Buffer>('maps', { keyEncoding: 'binary', encoding: 'binary' });
    const raw = Buffer.from(maps.get(mapKey(versionId, 0))!);
    const off = raw.length % 32; // 16 (the MAC) in schema 3, 0 before
    edit((i) => raw.subarray(off + i * 32, off + (i + 1) * 32));
    maps.putSync(mapKey(versionId, 0), raw);
  });
}

/** Edits a version record in the index (JSON after a 16-byte MAC in schema 3, msgpack before), keeping its MAC. */
async function editVersionRecord(repoDir: string, versionId: string, edit: (v: Record<string, unknown>) => void): Promise<void> {
  const sealed = await withIndex(repoDir, (root) => {
    const versions = root.openDB<Buffer, string>('versions', { encoding: 'binary' });
    const raw = versions.get(versionId)!;
    if (raw.length <= 16 || raw[16] !== 0x7b) return false;
    const v = JSON.parse(raw.subarray(16).toString('utf8')) as Record<string, unknown>;
    edit(v);
    versions.putSync(versionId, Buffer.concat([raw.subarray(0, 16), Buffer.from(JSON.stringify(v))]));
    return true;
  });
  if (!sealed) {
    await withIndex(repoDir, (root) => {
      const versions = root.openDB<Record<string, unknown>, string>('versions', {});
      const v = versions.get(versionId)!;
      edit(v);
      versions.putSync(versionId, v);
    });
  }
}

test('2. an edited index (block map entries swapped, a block made sparse, protection and expiry changed) is refused with exit 3 by restore, scrub, export, copy, rm and prune before anything is written', async (t) => {
  const iso = await isolated(t);
  const repo = await keyFileRepo(iso);
  const img = await distinctImage(iso.dir, 'edited');
  const v = await backupJson(repo, img.path, 'vol');
  await runOk(['protect', ...repo.args, v.id]);
  const dest = await keyFileRepo(iso, 'dest');
  const indexFile = path.join(repo.dir, 'index', 'index.mdb');
  const pristine = await fs.readFile(indexFile);
  const existing = path.join(iso.dir, 'existing.img');
  await fs.writeFile(existing, prngBytes('existing', 'x', 3 * MiB));
  const existingSha = await sha256File(existing);

  const edits: Array<[string, () => Promise<void>]> = [
    [
      'block map entries 0 and 2 swapped',
      () =>
        editMap(repo.dir, v.id, (e) => {
          const a = Buffer.from(e(0));
          e(2).copy(e(0));
          a.copy(e(2));
        }),
    ],
    ['block 1 made sparse', () => editMap(repo.dir, v.id, (e) => e(1).fill(0))],
    [
      'protection removed and an expiry in the past',
      () =>
        editVersionRecord(repo.dir, v.id, (r) => {
          r.protected = false;
          r.expire = '2001-01-01T00:00:00.000Z';
        }),
    ],
  ];
  for (const [what, edit] of edits) {
    await fs.writeFile(indexFile, pristine);
    await edit();
    const before = await storeFiles(repo.dir);
    const destBefore = await storeFiles(dest.dir);
    const target = path.join(iso.dir, `restored-${Math.random().toString(36).slice(2)}.img`);
    const exported = path.join(iso.dir, `export-${Math.random().toString(36).slice(2)}.json`);
    const checks: Array<[string, string[]]> = [
      ['restore to a new file', ['restore', ...repo.args, v.id, target]],
      ['restore over an existing file', ['restore', ...repo.args, '--force', v.id, existing]],
      ['scrub', ['scrub', ...repo.args, v.id]],
      ['export', ['export', ...repo.args, v.id, exported]],
      ['copy', ['copy', ...repo.args, v.id, '--to', dest.dir, '--to-key-file', dest.keyFile]],
    ];
    // rm and prune read the version record (protection, expiry), not the block map.
    if (what.startsWith('protection')) checks.push(['rm', ['rm', ...repo.args, v.id]], ['prune', ['prune', ...repo.args, '--keep-last', '5']]);
    for (const [cmd, args] of checks) {
      const r = await runCli(args);
      refused(t, r, 3, new RegExp(`index entry (maps/${v.id} chunk 0|versions/${v.id}) fails authentication`));
      if (cmd === 'restore to a new file') t.log(`${what}, ${cmd}: ${r.stderr.trim()}`);
    }
    t.false(existsSync(target), `${what}: restore created no target`);
    t.is(await sha256File(existing), existingSha, `${what}: the existing target was not written`);
    t.false(existsSync(exported), `${what}: export wrote no file`);
    await assertStoreUnchanged(t, repo.dir, before, `${what}: the repository`);
    await assertStoreUnchanged(t, dest.dir, destBefore, `${what}: the copy's destination`);
  }
  // What the refusal recommends works: `index rebuild` recreates the index from the store's manifests.
  await fs.writeFile(indexFile, pristine);
  await editMap(repo.dir, v.id, (e) => e(1).fill(0));
  await runOk(['index', 'rebuild', ...repo.args]);
  const good = path.join(iso.dir, 'good.img');
  await runOk(['restore', ...repo.args, v.id, good]);
  t.is(await sha256File(good), img.sha256);
});

// ------------------------------------------------------------------------------ 3. path traversal

/** Every file below `dir` outside the named sub-directories, with its content. */
async function filesOutside(dir: string, except: string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const f of await listFiles(dir)) if (!except.some((e) => f === e || f.startsWith(`${e}/`))) out.set(f, await sha256File(path.join(dir, f)));
  return out;
}

/** Plaintext of an object of an unencrypted repository (12-byte header, zstd or raw payload). */
async function readPlainObject(file: string): Promise<{ header: Buffer; plain: Buffer }> {
  const raw = await fs.readFile(file);
  const header = Buffer.from(raw.subarray(0, 12));
  const body = raw.subarray(12);
  const zlib = await import('node:zlib');
  return { header, plain: header[6] === 1 ? zlib.zstdDecompressSync(body) : Buffer.from(body) };
}

/** Writes an object of an unencrypted repository, uncompressed, of the same type. */
async function writePlainObject(file: string, header: Buffer, plain: Buffer): Promise<void> {
  const h = Buffer.from(header);
  h[6] = 0;
  await fs.writeFile(file, Buffer.concat([h, plain]));
}

/** Edits the JSON header of a manifest of an unencrypted repository. */
async function editManifest(file: string, edit: (m: Record<string, unknown>) => void): Promise<void> {
  const { header, plain } = await readPlainObject(file);
  const n = plain.readUInt32BE(0);
  const json = JSON.parse(plain.subarray(4, 4 + n).toString('utf8')) as Record<string, unknown>;
  edit(json);
  const head = Buffer.from(JSON.stringify(json));
  const len = Buffer.alloc(4);
  len.writeUInt32BE(head.length);
  await writePlainObject(file, header, Buffer.concat([len, head, plain.subarray(4 + n)]));
}

test('3. version ids never become paths: a crafted export for import and a crafted manifest for index rebuild are refused, nothing outside the repository is written or deleted', async (t) => {
  const iso = await isolated(t);
  const victim = path.join(iso.dir, 'victim');
  await fs.writeFile(victim, 'the victim file\n');
  const repo = await keyFileRepo(iso);
  const img = await distinctImage(iso.dir, 'paths');
  const v = await backupJson(repo, img.path, 'vol');
  const exportFile = path.join(iso.dir, 'v.json');
  await runOk(['export', ...repo.args, v.id, exportFile]);
  const exported = JSON.parse(await fs.readFile(exportFile, 'utf8')) as { version: { id: string } };
  const outside = ['repo', 'state', 'dest'];
  const before = await filesOutside(iso.dir, outside);
  const store = await storeFiles(repo.dir);
  // manifests/<id> and attributes/<id>: "../../victim" is iso.dir/victim.
  for (const id of ['../../victim', 'abcd/../../../victim', path.join(iso.dir, 'victim'), '..']) {
    const crafted = path.join(iso.dir, `crafted-${outside.length}.json`);
    await fs.writeFile(crafted, JSON.stringify({ ...exported, version: { ...exported.version, id } }));
    const r = await runCli(['import', ...repo.args, crafted]);
    refused(t, r, 1, /not a version id/);
    await fs.rm(crafted);
    t.deepEqual(await filesOutside(iso.dir, outside), before, `import of id ${id}: nothing outside the repository changed`);
    await assertStoreUnchanged(t, repo.dir, store, `import of id ${id}`);
  }

  // A crafted manifest (an unencrypted repository: whoever holds the disk can write one) through index rebuild.
  const plain = await plainRepo(iso, 'dest');
  const w = await backupJson(plain, img.path, 'vol');
  await editManifest(path.join(plain.dir, 'manifests', w.id), (m) => {
    (m.version as { id: string }).id = '../../victim';
  });
  // Rebuild reports it as damaged and does not recover the version (exit 0: the rest of the index is good).
  const rebuilt = await runJson<{ versions: number; damaged_manifests: string[] }>(['index', 'rebuild', ...plain.args]);
  t.deepEqual(rebuilt.damaged_manifests, [w.id]);
  t.is(rebuilt.versions, 0);
  const listed = await runCli(['ls', ...plain.args, '--json']);
  if (listed.code === 0)
    t.false(
      (JSON.parse(listed.stdout) as VersionJson[]).some((x) => x.id.includes('/') || x.id.includes('.')),
      'no version with a path for an id',
    );
  // Naming it on the command line (what a later rm or prune would do) is refused too.
  for (const cmd of [['rm', '--force'], ['protect']]) {
    const r = await runCli([cmd[0]!, ...plain.args, ...cmd.slice(1), '../../victim']);
    t.not(r.code, 0, `${cmd[0]} ../../victim refused`);
  }
  t.is(await fs.readFile(victim, 'utf8'), 'the victim file\n', 'the victim file is untouched');
  t.deepEqual(await filesOutside(iso.dir, outside), before, 'nothing outside the repositories changed');
});

test('3. the directory store refuses names that are absolute, contain "..", or leave its root, before touching a path', async (t) => {
  const dir = await tempDir(t, 'blocksafe-trust-store-');
  const root = path.join(dir, 'repo');
  await fs.mkdir(root);
  const { DirectoryStore } = await import('../src/store/directory.js');
  const store = new DirectoryStore(root);
  await store.put('manifests/good', Buffer.from('ok'));
  t.is((await store.get('manifests/good')).toString(), 'ok');
  await fs.writeFile(path.join(dir, 'outside'), 'outside\n');
  const bad = ['../outside', 'manifests/../../outside', path.join(dir, 'outside'), '/etc/passwd', '..', '.', 'manifests/..', 'a//b', '', 'manifests/x\0y', 'manifests\\..\\..\\outside'];
  for (const name of bad) {
    await t.throwsAsync(store.put(name, Buffer.from('evil')), undefined, `put ${JSON.stringify(name)}`);
    await t.throwsAsync(store.tryGet(name), undefined, `tryGet ${JSON.stringify(name)}`);
    await t.throwsAsync(store.delete([name]), undefined, `delete ${JSON.stringify(name)}`);
  }
  t.is(await fs.readFile(path.join(dir, 'outside'), 'utf8'), 'outside\n');
  t.deepEqual((await fs.readdir(dir)).sort(), ['outside', 'repo']);
  t.deepEqual(await listFiles(root), ['manifests/good']);
});

// ---------------------------------------------------------------------------------------- 6. rollback

test('6. rollback: an old attributes object put back after protect is noticed (with the index, and after index rebuild) and the version stays protected; deleted manifests are reported', async (t) => {
  const iso = await isolated(t);
  const repo = await keyFileRepo(iso);
  const img = await distinctImage(iso.dir, 'rollback');
  const v = await backupJson(repo, img.path, 'vol');
  const w = await backupJson(repo, img.path, 'other');
  const x = await backupJson(repo, img.path, 'third');
  const attributes = path.join(repo.dir, 'attributes', v.id);
  const unprotected = await fs.readFile(attributes);
  await runOk(['protect', ...repo.args, v.id]);
  const isProtected = async () => (await runJson<VersionJson[]>(['ls', ...repo.args])).find((y) => y.id === v.id)?.protected;

  // The index still knows the newer state: it is reported and written back.
  await fs.writeFile(attributes, unprotected);
  const ls = await runCli(['ls', ...repo.args, '--json']);
  t.is(ls.code, 0, ls.stderr);
  t.true((JSON.parse(ls.stdout) as VersionJson[]).find((y) => y.id === v.id)!.protected);
  t.regex(ls.stderr, new RegExp(`attributes of ${v.id} .*older`));
  t.false((await fs.readFile(attributes)).equals(unprotected), 'the newer attributes were written back');

  // After an index rebuild only this machine's trust record knows a newer generation existed: the version
  // stays protected, and rebuild says why.
  await fs.writeFile(attributes, unprotected);
  const rebuilt = await runJson<{ rolled_back?: string[] }>(['index', 'rebuild', ...repo.args]);
  t.deepEqual(rebuilt.rolled_back, [v.id]);
  t.true(await isProtected(), 'protection not undone by the rollback');
  refused(t, await runCli(['rm', ...repo.args, v.id]), 1, /is protected/);
  refused(t, await runCli(['rm', ...repo.args, '--force', v.id]), 1, /is protected/);
  t.true(existsSync(path.join(repo.dir, 'manifests', v.id)));

  // A deleted manifest: the next command says so (the index knew the version) ...
  await fs.rm(path.join(repo.dir, 'manifests', w.id));
  const after = await runCli(['ls', ...repo.args, '--json']);
  t.is(after.code, 0, after.stderr);
  t.false((JSON.parse(after.stdout) as VersionJson[]).some((y) => y.id === w.id));
  t.regex(after.stderr, new RegExp(`version ${w.id} \\(other\\) is no longer in the store`));
  // ... and so does an index rebuild, from this machine's trust record, when no index remembers it.
  await fs.rm(path.join(repo.dir, 'manifests', x.id));
  const rebuiltAgain = await runJson<{ missing_manifests?: string[]; versions: number }>(['index', 'rebuild', ...repo.args]);
  t.deepEqual(rebuiltAgain.missing_manifests, [x.id]);
  t.is(rebuiltAgain.versions, 1);
  // Reported once, not on every later command.
  t.notRegex((await runCli(['ls', ...repo.args])).stderr, /no manifest|no longer in the store/);
});

// ------------------------------------------------------------------------------------ 7. key rotation

test('7. rekey --master: afterwards an old copy of the keyring and slots with the old passphrase cannot read data written later', async (t) => {
  const iso = await isolated(t);
  const repo = await passphraseRepo(iso);
  const before = await distinctImage(iso.dir, 'before-rotation');
  await backupJson(repo, before.path, 'vol');
  const oldKeys = path.join(iso.dir, 'old-keys');
  await fs.cp(path.join(repo.dir, 'keys'), oldKeys, { recursive: true });

  await runOk(['rekey', ...repo.args, '--master'], { env: repo.env });
  const later = await distinctImage(iso.dir, 'after-rotation');
  const w = await backupJson(repo, later.path, 'vol');
  const good = path.join(iso.dir, 'good.img');
  await runOk(['restore', ...repo.args, w.id, good], { env: repo.env });
  t.is(await sha256File(good), later.sha256, 'the owner still restores');

  // Someone who kept the old slot (and knows the old passphrase) takes the disk as it is now, or also puts
  // an old keyring back, on a machine that never saw the repository (no trust record to notice).
  const { differingBlocks } = await import('./helpers.js');
  const elsewhere = await confWithState(iso.dir, 'elsewhere');
  const oldSlots = (await fs.readdir(oldKeys)).filter((f) => f.startsWith('slot-'));
  for (const [what, keyring] of [
    ['the current keyring', false],
    ['the old keyring', true],
  ] as const) {
    const stolen = path.join(iso.dir, `stolen-${keyring}`);
    await fs.cp(repo.dir, stolen, { recursive: true });
    for (const f of await fs.readdir(path.join(stolen, 'keys'))) if (f.startsWith('slot-') || keyring) await fs.rm(path.join(stolen, 'keys', f));
    for (const f of keyring ? await fs.readdir(oldKeys) : oldSlots) await fs.copyFile(path.join(oldKeys, f), path.join(stolen, 'keys', f));
    const thief = ['--config', elsewhere.conf, '--repo', stolen];
    const out = path.join(iso.dir, `stolen-${keyring}.img`);
    const r = await runCli(['restore', ...thief, w.id, out], { env: repo.env });
    t.log(`old slot, old passphrase, ${what}: restore exit ${r.code}: ${r.stderr.trim().split('\n').pop()}`);
    t.not(r.code, 0, `${what}: the old slot does not restore data written after the rotation`);
    if (existsSync(out)) t.is((await differingBlocks(out, later)).length, later.blockHashes.length, `${what}: not one block of the new data was decrypted`);
    // Nor after rebuilding the index from the store with them: what was written under the new keys does
    // not open, so the version is not even listed.
    const rebuilt = await runCli(['index', 'rebuild', ...thief, '--json'], { env: repo.env });
    if (rebuilt.code === 0) t.true((JSON.parse(rebuilt.stdout) as { damaged_manifests: string[] }).damaged_manifests.includes(w.id));
    const listed = await runCli(['ls', ...thief, '--json'], { env: repo.env });
    if (listed.code === 0) t.false((JSON.parse(listed.stdout) as VersionJson[]).some((y) => y.id === w.id));
  }
});

// ------------------------------------------------------------------------------------------ 8. limits

/** Runs the CLI under /usr/bin/time: its result and the peak RSS of the process (MiB). */
async function runMeasured(args: string[], env: Record<string, string> = {}): Promise<CliResult & { peakMiB: number }> {
  const { BIN, cliEnv } = await import('./helpers.js');
  const { spawn } = await import('node:child_process');
  const { tmpdir } = await import('node:os');
  const timeFile = path.join(tmpdir(), `blocksafe-time-${process.pid}-${Math.random().toString(36).slice(2)}`);
  const r = await new Promise<CliResult>((resolve, reject) => {
    const child = spawn('/usr/bin/time', ['-f', '%M', '-o', timeFile, process.execPath, BIN, ...args], { env: cliEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') }));
  });
  const text = await fs.readFile(timeFile, 'utf8');
  await fs.rm(timeFile, { force: true });
  // time(1) adds "Command exited with non-zero status N" before the number.
  return { ...r, peakMiB: Number(text.trim().split('\n').pop()) / 1024 };
}

test('8. a key slot edited to scrypt N=2^20 or 2^30 (or huge r, p) is refused with exit 3 in one line, in bounded memory; new slots are calibrated within the caps', async (t) => {
  const iso = await isolated(t);
  const repo = await passphraseRepo(iso);
  const slotFile = path.join(repo.dir, 'keys', 'slot-1.json');
  const original = await fs.readFile(slotFile, 'utf8');
  const slot = JSON.parse(original) as { kdf: { name: string; N: number; r: number; p: number } };
  t.is(slot.kdf.name, 'scrypt');
  t.true(slot.kdf.N >= 2 ** 16 && slot.kdf.r === 8 && slot.kdf.p >= 2, `new slot calibrated: ${JSON.stringify(slot.kdf)}`);
  t.true(128 * slot.kdf.N * slot.kdf.r <= 128 * MiB, 'within the 128 MiB memory cap');
  const baseline = await runMeasured(['ls', ...repo.args], repo.env);
  t.is(baseline.code, 0, baseline.stderr);
  for (const kdf of [{ N: 2 ** 20 }, { N: 2 ** 30 }, { r: 2 ** 20 }, { p: 2 ** 30 }, { N: 2 ** 17, r: 64 }]) {
    await fs.writeFile(slotFile, JSON.stringify({ ...slot, kdf: { ...slot.kdf, ...kdf } }));
    const r = await runMeasured(['ls', ...repo.args], repo.env);
    t.log(`${JSON.stringify(kdf)}: exit ${r.code}, peak RSS ${r.peakMiB.toFixed(0)} MiB (an unedited slot: ${baseline.peakMiB.toFixed(0)} MiB): ${r.stderr.trim()}`);
    refused(t, r, 3, /slot-1\.json|key slot|scrypt/i);
    t.notRegex(r.stderr, /unexpected error|please report/i);
    // The unchecked derivation needed 1 GiB (N=2^20) or failed to allocate; refused, it costs no more than an ordinary open.
    t.true(r.peakMiB < baseline.peakMiB + 32, `${JSON.stringify(kdf)}: peak RSS ${r.peakMiB.toFixed(0)} MiB`);
  }
  await fs.writeFile(slotFile, original);
  await runOk(['ls', ...repo.args], { env: repo.env });
});

test('8. malformed key slots, keyrings and descriptors: exit 3 with one line, never "unexpected error"', async (t) => {
  const iso = await isolated(t);
  const enc = await keyFileRepo(iso);
  const plain = await plainRepo(iso, 'plain');
  const slotFile = path.join(enc.dir, 'keys', 'slot-1.json');
  const slot = JSON.parse(await fs.readFile(slotFile, 'utf8')) as Record<string, unknown> & { kdf: Record<string, unknown> };
  const cases: Array<[string, RepoFixture, string, string | Buffer]> = [
    ['slot: not JSON', enc, 'keys/slot-1.json', '{"format": 1, "id": '],
    ['slot: JSON null', enc, 'keys/slot-1.json', 'null'],
    ['slot: kdf missing', enc, 'keys/slot-1.json', JSON.stringify({ ...slot, kdf: undefined })],
    ['slot: salt a number', enc, 'keys/slot-1.json', JSON.stringify({ ...slot, kdf: { ...slot.kdf, salt: 7 } })],
    ['slot: unknown kdf', enc, 'keys/slot-1.json', JSON.stringify({ ...slot, kdf: { ...slot.kdf, name: 'argon9' } })],
    ['slot: wrapped key truncated', enc, 'keys/slot-1.json', JSON.stringify({ ...slot, wrapped: 'AAAA' })],
    ['slot: id a string', enc, 'keys/slot-1.json', JSON.stringify({ ...slot, id: 'one' })],
    ['slot: 1 MiB of spaces', enc, 'keys/slot-1.json', ' '.repeat(MiB)],
    ['keyring (encrypted): random bytes', enc, 'keys/keyring', randomBytes(200)],
    ['keyring (encrypted): truncated', enc, 'keys/keyring', Buffer.alloc(5)],
    ['keyring (plain): not JSON', plain, 'keys/keyring', 'garbage'],
    ['keyring (plain): data keys wrong', plain, 'keys/keyring', JSON.stringify({ format: 2, mac_key: randomBytes(32).toString('base64'), current_key_id: 'x', data_keys: 5 })],
    ['descriptor: not JSON', enc, 'blocksafe.json', '{"format": "blocksafe-repository",'],
    ['descriptor: block size a string', enc, 'blocksafe.json', 'BLOCK_SIZE'],
    ['descriptor: format_version a string', enc, 'blocksafe.json', 'FORMAT_VERSION'],
    ['descriptor: 1 MiB', enc, 'blocksafe.json', Buffer.alloc(MiB, 0x20)],
  ];
  for (const [what, repo, file, content] of cases) {
    const target = path.join(repo.dir, file);
    const original = await fs.readFile(target);
    let data: string | Buffer = content;
    if (content === 'BLOCK_SIZE' || content === 'FORMAT_VERSION') {
      const d = JSON.parse(original.toString('utf8')) as Record<string, unknown>;
      if (content === 'BLOCK_SIZE') d.block_size = '4M';
      else d.format_version = '1';
      data = JSON.stringify(d);
    }
    await fs.writeFile(target, data);
    const r = await runCli(['ls', ...repo.args]);
    t.log(`${what}: exit ${r.code}: ${r.stderr.trim()}`);
    refused(t, r, 3, /damaged|malformed|key slot|keyring|blocksafe\.json/i);
    t.notRegex(r.stderr, /unexpected error|please report/i, what);
    await fs.writeFile(target, original);
  }
  await runOk(['ls', ...enc.args]);
  await runOk(['ls', ...plain.args]);
});

// -------------------------------------------------------------------------------------- 9. file modes

async function mode(file: string): Promise<string> {
  return ((await fs.stat(file)).mode & 0o777).toString(8).padStart(4, '0');
}

test('9. the index, trust records and restored files are owner-only; an index made readable is tightened on open', async (t) => {
  const iso = await isolated(t);
  const repo = await keyFileRepo(iso);
  const img = await distinctImage(iso.dir, 'modes');
  const v = await backupJson(repo, img.path, 'vol');
  const indexDir = path.join(repo.dir, 'index');
  const check = async (when: string) => {
    t.is(await mode(indexDir), '0700', `${when}: index directory`);
    for (const f of await fs.readdir(indexDir)) t.is(await mode(path.join(indexDir, f)), '0600', `${when}: index/${f}`);
  };
  await check('after backup');
  const trustDir = path.join(iso.stateDir, 'trust');
  t.is(await mode(trustDir), '0700');
  for (const f of await fs.readdir(trustDir)) t.is(await mode(path.join(trustDir, f)), '0600', `trust/${f}`);
  const out = path.join(iso.dir, 'out.img');
  await runOk(['restore', ...repo.args, v.id, out]);
  t.is(await mode(out), '0600', 'restored file');
  // An index left readable by an older blocksafe (0644 in 0755) is tightened by the next command.
  await fs.chmod(indexDir, 0o755);
  for (const f of await fs.readdir(indexDir)) await fs.chmod(path.join(indexDir, f), 0o644);
  await runOk(['ls', ...repo.args]);
  await check('after ls of a readable index');
});

test('9. a configuration holding secret_access_key, a key file or a passphrase file readable by others earns a warning; owner-only ones do not', async (t) => {
  const iso = await isolated(t);
  const repo = await keyFileRepo(iso);
  const warning = /^blocksafe: warning: .* is readable by other users \(mode 0644\); run "chmod 600 .*"\.$/m;
  // The key file.
  await fs.chmod(repo.keyFile, 0o644);
  const k = await runOk(['ls', ...repo.args]);
  t.regex(k.stderr, warning);
  t.true(k.stderr.includes(repo.keyFile));
  await fs.chmod(repo.keyFile, 0o600);
  t.notRegex((await runOk(['ls', ...repo.args])).stderr, /warning/);
  // A configuration file with an S3 secret.
  const conf = path.join(iso.dir, 'secret.conf');
  await fs.writeFile(conf, `[s3]\nstate_dir = ${iso.stateDir}\naccess_key_id = AKIA\nsecret_access_key = hunter2\n`, { mode: 0o644 });
  await fs.chmod(conf, 0o644);
  const withConf = ['--config', conf, '--repo', repo.dir, '--key-file', repo.keyFile];
  const c = await runOk(['ls', ...withConf]);
  t.regex(c.stderr, warning);
  t.true(c.stderr.includes(conf));
  t.false(c.stderr.includes('hunter2'), 'the secret itself is never printed');
  await fs.chmod(conf, 0o600);
  t.notRegex((await runOk(['ls', ...withConf])).stderr, /warning/);
  // A passphrase file.
  const pIso = await isolated(t);
  const pRepo = await passphraseRepo(pIso);
  const pfile = path.join(pIso.dir, 'passphrase');
  await fs.writeFile(pfile, `${PASSPHRASE}\n`);
  await fs.chmod(pfile, 0o644);
  const p = await runOk(['ls', ...pRepo.args, '--passphrase-file', pfile]);
  t.regex(p.stderr, warning);
  t.true(p.stderr.includes(pfile));
  // A failing command keeps its one-line error (the warning waits for the next successful run).
  refused(t, await runCli(['show', ...pRepo.args, '--passphrase-file', pfile, 'zzzzzzzz']), 1, /zzzzzzzz/);
});

test('9. child processes (lvm) never see passphrases or S3 secrets in their environment', async (t) => {
  const { createCommandRunner } = await import('../src/engine/lvm.js');
  const env = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    KEEP_ME: 'visible',
    BLOCKSAFE_PASSPHRASE: 'pass-1',
    BLOCKSAFE_TO_PASSPHRASE: 'pass-2',
    BLOCKSAFE_NEW_PASSPHRASE: 'pass-3',
    AWS_SECRET_ACCESS_KEY: 'aws-secret',
    AWS_SESSION_TOKEN: 'aws-token',
  };
  const run = createCommandRunner({ env });
  const { stdout } = await run('env', []);
  t.regex(stdout, /^KEEP_ME=visible$/m);
  for (const secret of ['pass-1', 'pass-2', 'pass-3', 'aws-secret', 'aws-token']) t.false(stdout.includes(secret), secret);
  // The default runner (what backup of an LVM volume uses) strips the calling process's environment too.
  const saved = { ...process.env };
  try {
    Object.assign(process.env, env);
    const { stdout: fromProcess } = await createCommandRunner()('env', []);
    t.regex(fromProcess, /^KEEP_ME=visible$/m);
    for (const secret of ['pass-1', 'aws-secret']) t.false(fromProcess.includes(secret), secret);
  } finally {
    for (const k of Object.keys(env)) if (!(k in saved)) delete process.env[k];
    Object.assign(process.env, saved);
  }
});

// ------------------------------------------------------------------------------------------ 10. formats

test('10. manifests, attributes, keyrings and slots of a newer format are refused clearly (exit 1, "newer", one line), not misread', async (t) => {
  const iso = await isolated(t);
  const plain = await plainRepo(iso, 'plain');
  const img = await distinctImage(iso.dir, 'formats');
  const v = await backupJson(plain, img.path, 'vol');

  // A manifest from the future, met by an index rebuild.
  const manifest = path.join(plain.dir, 'manifests', v.id);
  const manifestBefore = await fs.readFile(manifest);
  await editManifest(manifest, (m) => (m.manifest_format = 2));
  refused(t, await runCli(['index', 'rebuild', ...plain.args]), 1, /manifest.*newer|newer.*manifest/i);
  await fs.writeFile(manifest, manifestBefore);
  await runOk(['index', 'rebuild', ...plain.args]);

  // Attributes from the future, met by the next command's sync (and by a rebuild).
  const attributes = path.join(plain.dir, 'attributes', v.id);
  const attributesBefore = await fs.readFile(attributes);
  const { header, plain: attrs } = await readPlainObject(attributes);
  await writePlainObject(attributes, header, Buffer.from(JSON.stringify({ ...JSON.parse(attrs.toString('utf8')), attributes_format: 2, generation: 99 })));
  refused(t, await runCli(['ls', ...plain.args]), 1, /attributes.*newer|newer.*attributes/i);
  refused(t, await runCli(['index', 'rebuild', ...plain.args]), 1, /attributes.*newer|newer.*attributes/i);
  await fs.writeFile(attributes, attributesBefore);
  await runOk(['index', 'rebuild', ...plain.args]);

  // A keyring from the future (unencrypted: plain JSON).
  const keyringFile = path.join(plain.dir, 'keys', 'keyring');
  const keyringBefore = await fs.readFile(keyringFile);
  await fs.writeFile(keyringFile, JSON.stringify({ ...JSON.parse(keyringBefore.toString('utf8')), format: 3 }));
  refused(t, await runCli(['ls', ...plain.args]), 1, /keyring.*newer|newer.*keyring/i);
  await fs.writeFile(keyringFile, keyringBefore);

  // A key slot from the future.
  const enc = await keyFileRepo(iso, 'enc');
  const slotFile = path.join(enc.dir, 'keys', 'slot-1.json');
  const slot = JSON.parse(await fs.readFile(slotFile, 'utf8')) as Record<string, unknown>;
  await fs.writeFile(slotFile, JSON.stringify({ ...slot, format: 2 }));
  refused(t, await runCli(['ls', ...enc.args]), 1, /slot.*newer|newer.*slot/i);
  await fs.writeFile(slotFile, JSON.stringify(slot));

  // Nothing was changed by the refusals: both repositories work, the version restores byte-identical.
  await runOk(['ls', ...enc.args]);
  const out = path.join(iso.dir, 'out.img');
  await runOk(['restore', ...plain.args, v.id, out]);
  t.is(await sha256File(out), img.sha256);
});
