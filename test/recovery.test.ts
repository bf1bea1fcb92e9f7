/**
 * Disaster recovery and portability (issue 7): index rebuild from the store alone, copy between
 * repositories, export/import, key slots, rekey, format versioning and index migration.
 * Real CLI, real files; the S3 halves live in test/s3.test.ts against the real RADOS Gateway.
 */
import test from 'ava';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { open as openLmdb } from 'lmdb';
import {
  assertCliError,
  backupJson,
  initKeyFileRepo,
  initRepo,
  listObjects,
  makeImage,
  MiB,
  runCli,
  runJson,
  runOk,
  sha256File,
  tempDir,
  ROOT,
  run,
  type RepoFixture,
  type VersionJson,
} from './helpers.js';
import { killOnTeardown, pausePoints, spawnCli } from './cliHarness.js';

async function image(dir: string, name = 'disk.img', seed = 'recovery') {
  return makeImage(path.join(dir, name), {
    blocks: ['random', 'zero', 'text', { dup: 0 }, 'random', 'text'],
    blockSize: 1 * MiB,
    tail: { bytes: 12345, kind: 'text' },
    seed,
  });
}

async function restoredHash(repo: RepoFixture, id: string, dir: string): Promise<string> {
  const out = path.join(dir, `restore-${id}-${Math.random().toString(36).slice(2)}.img`);
  await runOk(['restore', ...repo.args, id, out], { env: repo.env });
  return sha256File(out);
}

test('index rebuild from the store alone restores tags, protection, expiry and the data', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const img = await image(dir);
  const v1 = await backupJson(repo, img.path, 'vol');
  const img2 = await image(dir, 'other.img', 'other');
  const v2 = await backupJson(repo, img2.path, 'other');
  await runOk(['tag', 'add', ...repo.args, v1.id, 'keepme'], { env: repo.env });
  await runOk(['protect', ...repo.args, v1.id], { env: repo.env });
  await runOk(['expire', ...repo.args, v2.id, '2031-05-06'], { env: repo.env });
  const before = await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env });

  const strip = (vs: VersionJson[]) => vs.map(({ id, name, date, size, tags, protected: p, expire, valid, complete }) => ({ id, name, date, size, tags, p, expire, valid, complete }));
  await fs.rm(path.join(repo.dir, 'index'), { recursive: true });
  // The index is a cache of the store: any command brings the versions back from the manifests.
  t.deepEqual(strip(await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env })), strip(before), 'a lost index is refilled from the store');
  await fs.rm(path.join(repo.dir, 'index'), { recursive: true });
  const r = await runJson<{ versions: number; missing_blocks: number }>(['index', 'rebuild', ...repo.args], { env: repo.env });
  t.is(r.versions, 2);
  t.is(r.missing_blocks, 0);
  const after = await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env });
  t.deepEqual(strip(after), strip(before));
  t.is(await restoredHash(repo, v1.id, dir), img.sha256);
  t.is(await restoredHash(repo, v2.id, dir), img2.sha256);
  // Dedup keeps working against the rebuilt block table.
  const again = await backupJson(repo, img.path, 'vol');
  t.is(again.stats.blocks_written, 0);
});

test('index rebuild marks versions whose blocks are missing as invalid', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const img = await image(dir);
  const v = await backupJson(repo, img.path, 'vol');
  const objects = await listObjects(repo.dir);
  await fs.rm(path.join(repo.dir, objects[0]!));
  await fs.rm(path.join(repo.dir, 'index'), { recursive: true });
  const r = await runJson<{ versions: number; missing_blocks: number }>(['index', 'rebuild', ...repo.args], { env: repo.env });
  t.is(r.missing_blocks, 1);
  const [after] = await runJson<VersionJson[]>(['show', ...repo.args, v.id], { env: repo.env }).then((x) => [x as unknown as VersionJson]);
  t.false(after!.valid);
});

test('index rebuild names the versions the previous index knew whose manifests the store lacks (before a cleanup would drop their blocks)', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { encryption: 'none', blockSize: '1M' });
  const img = await image(dir);
  const kept = await backupJson(repo, img.path, 'kept');
  const lost = await backupJson(repo, img.path, 'lost');
  await fs.rename(path.join(repo.dir, 'manifests', lost.id), path.join(dir, 'manifest.bak'));
  const r = await runJson<{ versions: number; not_in_store: { id: string; name: string }[] }>(['index', 'rebuild', ...repo.args], { env: repo.env });
  t.is(r.versions, 1);
  t.deepEqual(r.not_in_store, [{ id: lost.id, name: 'lost' }]);
  const text = await runCli(['index', 'rebuild', ...repo.args], { env: repo.env });
  t.is(text.code, 0);
  t.notRegex(text.stdout, /WARNING/, "the second rebuild compares with the first rebuild's index, which already lacked it");
  t.deepEqual(
    (await runJson<VersionJson[]>(['ls', ...repo.args], { env: repo.env })).map((v) => v.id),
    [kept.id],
  );
});

test('copy to another repository with other keys, then on to a third; a second copy sends nothing', async (t) => {
  const dir = await tempDir(t);
  const a = await initRepo(path.join(dir, 'a'), { blockSize: '1M', passphrase: 'first' });
  const b = await initKeyFileRepo(path.join(dir, 'b'), { blockSize: '1M' });
  const c = await initRepo(path.join(dir, 'c'), { blockSize: '1M', encryption: 'none' });
  const img = await image(dir);
  const v = await backupJson(a, img.path, 'vol', ['-t', 'mine']);
  await runOk(['protect', ...a.args, v.id], { env: a.env });

  type CopyJson = { version: string; blocks_sent: number; blocks_known: number; already_there: boolean }[];
  const first = await runJson<CopyJson>(['copy', ...a.args, v.id, '--to', b.dir, '--to-key-file', b.keyFile], { env: a.env });
  t.is(first[0]!.blocks_sent, 5, 'five distinct non-zero blocks (one duplicate, one sparse, the tail counts)');
  const second = await runJson<CopyJson>(['copy', ...a.args, v.id, '--to', b.dir, '--to-key-file', b.keyFile], { env: a.env });
  t.true(second[0]!.already_there);
  t.is(second[0]!.blocks_sent, 0);

  await runJson(['copy', ...b.args, v.id, '--to', c.dir], { env: {} });
  t.is(await restoredHash(c, v.id, dir), img.sha256);
  const shown = await runJson<VersionJson>(['show', ...c.args, v.id]);
  t.true(shown.protected);
  t.true(shown.tags.includes('mine'));
  t.is(shown.stats.bytes_read, v.stats.bytes_read, 'the original backup statistics travel with the version');

  // The same data backed up again in A and copied: the destination already has every block.
  const v2 = await backupJson(a, img.path, 'vol');
  const third = await runJson<CopyJson>(['copy', ...a.args, v2.id, '--to', b.dir, '--to-key-file', b.keyFile], { env: a.env });
  t.is(third[0]!.blocks_sent, 0);
  t.true(third[0]!.blocks_known > 0);
});

test('a copy killed midway resumes and completes byte-identical', async (t) => {
  const dir = await tempDir(t);
  const a = await initRepo(path.join(dir, 'a'), { encryption: 'none', blockSize: '64K' });
  const b = await initRepo(path.join(dir, 'b'), { encryption: 'none', blockSize: '64K' });
  // 160 blocks: the destination commits after 64 at the latest, so the first commit is midway.
  const img = await makeImage(path.join(dir, 'big.img'), { blocks: Array(160).fill('random'), blockSize: 64 * 1024, seed: 'copykill' });
  const v = await backupJson(a, img.path, 'vol');
  // The copy stops at its first committed progress in the destination (a pause point), then is killed.
  const pause = await pausePoints(t);
  const bg = killOnTeardown(t, spawnCli(['copy', ...a.args, v.id, '--to', b.dir], pause.env('writer.commit#1')));
  t.true(await pause.reached('writer.commit#1', bg), bg.stderr());
  await bg.kill9();
  const partial = (await runJson<(VersionJson & { blocks_done: number })[]>(['ls', ...b.args]))[0]!;
  t.false(partial.complete);
  t.true(partial.blocks_done > 0 && partial.blocks_done < 160, `blocks_done ${partial.blocks_done}`);
  const resumed = await runJson<{ blocks_sent: number }[]>(['copy', ...a.args, v.id, '--to', b.dir]);
  t.true(resumed[0]!.blocks_sent <= 160 - partial.blocks_done + 1, 'committed blocks are not sent again');
  t.is(await restoredHash(b, v.id, dir), img.sha256);
});

test('export and import keep everything; import of a version whose blocks are missing is refused', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const img = await image(dir);
  const v = await backupJson(repo, img.path, 'vol', ['-t', 'weekly', '-s', 'snap-1']);
  await runOk(['protect', ...repo.args, v.id], { env: repo.env });
  await runOk(['expire', ...repo.args, v.id, '2030-01-01'], { env: repo.env });
  const exported = path.join(dir, 'v.json');
  await runOk(['export', ...repo.args, v.id, exported], { env: repo.env });
  const before = await runJson<VersionJson>(['show', ...repo.args, v.id], { env: repo.env });
  await runOk(['unprotect', ...repo.args, v.id], { env: repo.env });
  await runOk(['rm', ...repo.args, '--force', v.id], { env: repo.env });
  const imported = await runJson<VersionJson>(['import', ...repo.args, exported], { env: repo.env });
  const { blocks_done: _a, ...i } = imported as VersionJson & { blocks_done?: number };
  const { blocks_done: _b, ...b } = before as VersionJson & { blocks_done?: number };
  t.deepEqual(i, b, 'id, dates, tags, protection, expiry, snapshot name and stats survive');
  t.is(await restoredHash(repo, v.id, dir), img.sha256);
  // Importing again is refused (it exists); into an empty repository it is refused (blocks missing).
  assertCliError(t, await runCli(['import', ...repo.args, exported], { env: repo.env }), 1, /already exists/);
  const other = await initRepo(path.join(dir, 'other'), { blockSize: '1M' });
  const r = await runCli(['import', ...other.args, exported], { env: other.env });
  assertCliError(t, r, 1, /blocks are missing from this repository.*nothing was imported/);
  t.deepEqual(await runJson(['ls', ...other.args], { env: other.env }), []);
  // A truncated export file is refused clearly.
  const text = await fs.readFile(exported, 'utf8');
  await fs.writeFile(path.join(dir, 'cut.json'), text.slice(0, text.length / 2));
  assertCliError(t, await runCli(['import', ...other.args, path.join(dir, 'cut.json')], { env: other.env }), 1, /not valid JSON.*truncated/);
});

test('key slots: passphrase change, key-file slot alone, last slot kept', async (t) => {
  const dir = await tempDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', passphrase: 'old secret' });
  const img = await image(dir);
  const v = await backupJson(repo, img.path, 'vol');
  await runOk(['key', 'passwd', ...repo.args], { env: { BLOCKSAFE_PASSPHRASE: 'old secret', BLOCKSAFE_NEW_PASSPHRASE: 'new secret' } });
  assertCliError(t, await runCli(['ls', ...repo.args], { env: { BLOCKSAFE_PASSPHRASE: 'old secret' } }), 1, /Wrong passphrase/);
  await runOk(['ls', ...repo.args], { env: { BLOCKSAFE_PASSPHRASE: 'new secret' } });

  const keyFile = path.join(dir, 'key');
  await fs.writeFile(keyFile, Buffer.alloc(64, 7));
  await runOk(['key', 'add', ...repo.args, '--new-key-file', keyFile], { env: { BLOCKSAFE_PASSPHRASE: 'new secret' } });
  const slots = await runJson<{ id: number; type: string }[]>(['key', 'list', ...repo.args], { env: { BLOCKSAFE_PASSPHRASE: 'new secret' } });
  t.deepEqual(
    slots.map((s) => s.type),
    ['passphrase', 'keyfile'],
  );
  // The key file alone opens the repository and restores.
  const out = path.join(dir, 'kf.img');
  await runOk(['restore', '--repo', repo.dir, '--key-file', keyFile, v.id, out]);
  t.is(await sha256File(out), img.sha256);
  // Remove the passphrase slot: now only the key file works; the last slot cannot go.
  await runOk(['key', 'remove', '--repo', repo.dir, '--key-file', keyFile, '1']);
  assertCliError(t, await runCli(['ls', ...repo.args], { env: { BLOCKSAFE_PASSPHRASE: 'new secret' } }), 1, /no passphrase key slot/);
  assertCliError(t, await runCli(['key', 'remove', '--repo', repo.dir, '--key-file', keyFile, '2']), 1, /last key slot/);
});

test('rekey re-encrypts every object under a new key id and retires the old one', async (t) => {
  const dir = await tempDir(t);
  const repo = await initKeyFileRepo(path.join(dir, 'repo'), { blockSize: '1M' });
  const img = await image(dir);
  const v = await backupJson(repo, img.path, 'vol');
  const keyIdOf = async (rel: string) => (await fs.readFile(path.join(repo.dir, rel))).readUInt32BE(8);
  const objects = await listObjects(repo.dir);
  t.is(await keyIdOf(objects[0]!), 1);
  const r = await runJson<{ key_id: number; retired_keys: number[]; blocks_rewritten: number }>(['rekey', ...repo.args]);
  t.is(r.key_id, 2);
  t.deepEqual(r.retired_keys, [1]);
  t.is(r.blocks_rewritten, objects.length);
  for (const o of objects) t.is(await keyIdOf(o), 2, `object ${o} re-encrypted`);
  t.is(await keyIdOf(`manifests/${v.id}`), 2);
  t.is(await restoredHash(repo, v.id, dir), img.sha256);
  const scrub = await runJson<{ damaged: unknown[] }>(['scrub', ...repo.args, '--all']);
  t.deepEqual(scrub.damaged, []);
  // A new backup after the rotation uses key 2 and deduplicates against the re-encrypted blocks.
  t.is((await backupJson(repo, img.path, 'vol')).stats.blocks_written, 0);
});

test('a repository written by the previous release (index schema 2, keyring format 1) is migrated and restores; a newer format is refused clearly', async (t) => {
  const dir = await tempDir(t);
  // Made by blocksafe 6a6f782 (see fixture.json): two versions of one volume, a tag and protection on the first.
  await run('tar', ['xzf', path.join(ROOT, 'test', 'fixtures', 'schema2-repo.tar.gz'), '-C', dir]);
  const fx = JSON.parse(await fs.readFile(path.join(dir, 'fixture.json'), 'utf8')) as { v1: string; v2: string; sha1: string; sha2: string };
  // The fixture's repository id is the same on every run: this machine's trust record (which remembers the
  // migrated keyring's generation) must be this test's own, or the next run would rightly see an old keyring.
  const conf = path.join(dir, 'test.conf');
  await fs.writeFile(conf, `[s3]\nstate_dir = ${path.join(dir, 'state')}\n`, { mode: 0o600 });
  const repo = { dir: path.join(dir, 'repo'), args: ['--config', conf, '--repo', path.join(dir, 'repo'), '--key-file', path.join(dir, 'repo.key')], env: {} };
  const keyringBefore = await fs.readFile(path.join(repo.dir, 'keys', 'keyring'));
  const listed = await runJson<VersionJson[]>(['ls', ...repo.args]);
  t.deepEqual(listed.map((v) => v.id).sort(), [fx.v1, fx.v2].sort());
  const v1 = listed.find((v) => v.id === fx.v1)!;
  t.true(v1.protected);
  t.true(v1.tags.includes('keepme'));
  t.is(await restoredHash(repo, fx.v1, dir), fx.sha1);
  t.is(await restoredHash(repo, fx.v2, dir), fx.sha2);
  t.deepEqual((await runJson<{ damaged: unknown[] }>(['scrub', ...repo.args, '--all'])).damaged, []);
  // The index is at the current schema, and the keyring was rewritten once to authenticate the descriptor.
  const env = openLmdb({ path: path.join(repo.dir, 'index', 'index.mdb'), maxDbs: 16, compression: false });
  t.is(env.openDB<unknown, string>('meta', {}).get('schema'), 3);
  await env.close();
  t.false((await fs.readFile(path.join(repo.dir, 'keys', 'keyring'))).equals(keyringBefore), 'keyring upgraded');
  // A new backup still deduplicates against the migrated block table.
  t.is((await backupJson(repo, path.join(dir, 'vol.img'), 'vol')).stats.blocks_written, 0);
  // Putting the old (format 1) keyring back is now a rollback this machine refuses, and says how to accept it.
  const upgraded = await fs.readFile(path.join(repo.dir, 'keys', 'keyring'));
  await fs.writeFile(path.join(repo.dir, 'keys', 'keyring'), keyringBefore);
  assertCliError(t, await runCli(['ls', ...repo.args]), 3, /older \(generation 0\) than one this machine already saw \(1\).*delete .*state\/trust\//);
  await fs.writeFile(path.join(repo.dir, 'keys', 'keyring'), upgraded);

  // An index from the future is refused with a clear message.
  const env3 = openLmdb({ path: path.join(repo.dir, 'index', 'index.mdb'), maxDbs: 16, compression: false });
  await env3.openDB<unknown, string>('meta', {}).put('schema', 99);
  await env3.close();
  assertCliError(t, await runCli(['ls', ...repo.args]), 1, /newer blocksafe \(schema 99/);

  // A repository descriptor from the future too.
  const descriptor = JSON.parse(await fs.readFile(path.join(repo.dir, 'blocksafe.json'), 'utf8'));
  descriptor.format_version = 7;
  await fs.writeFile(path.join(repo.dir, 'blocksafe.json'), JSON.stringify(descriptor));
  assertCliError(t, await runCli(['ls', ...repo.args]), 1, /format 7, newer than this blocksafe supports/);
});
