/**
 * Issue 14 ("Trust: authenticated metadata, contained paths, and nothing an attacker's input can
 * exhaust"): one test per reproduced item, driving the real CLI against a repository someone else edited.
 * Items 4 (addon cache swap race) and 5 (NBD access and floods) are in test/binary.test.ts and
 * test/nbd.test.ts; the zstd bomb of item 8 in test/codec.test.ts.
 *
 * Against the code before the safety work (6a6f782, /tmp/oldcode: this file and test/helpers.ts,
 * test/cliHarness.ts copied into a build of it, with a node:zlib shim for its zstd-napi), every test here
 * fails — see OLD_CODE below the imports for what each one met there.
 */
import { createHmac, randomBytes } from 'node:crypto';
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
 * OLD_CODE — what each test met on 6a6f782 (run with `npx ava test/trust.test.ts` in a build of it):
 *   1 downgrade ............ FAILS: backup with the passphrase exits 0 and writes the marker in clear.
 *   2 edited index ......... FAILS: restore of the swapped map exits 0 ("verified"), halves swapped.
 *   3 path traversal ....... FAILS: (filled in below)
 *   6 rollback ............. FAILS: (filled in below)
 *   7 key rotation ......... FAILS: (filled in below)
 *   8 limits ............... FAILS: (filled in below)
 *   9 file modes ........... FAILS: (filled in below)
 *  10 formats .............. FAILS: (filled in below)
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
  const edited = { ...descriptor, encryption: 'none', compression: 'none' };
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
