/**
 * How a front end (the CLI, the terminal UI) reaches a repository: the global options, the configuration,
 * secrets, opening with the configured lock timings, and the pipeline settings. Nothing here talks to a
 * terminal: asking for a passphrase is the caller's `prompt`.
 */
import { existsSync, readFileSync } from 'node:fs';
import { loadConfig, type LoadedConfig } from '../config/config.js';
import { describeSystemError, UsageError } from '../errors.js';
import { openWithTemporaryIndex } from './rebuild.js';
import { DirectoryStore } from '../store/directory.js';
import { indexDirFor, openStore, Repository, type OpenOptions, type Secret, type SecretSource } from './repository.js';
import { syncIndex, type SyncReport } from './indexSync.js';
import { s3Settings } from '../store/s3.js';
import * as path from 'node:path';
import { defaultThreads } from './workerPool.js';
import { Throttle } from '../util/throttle.js';
import { deferredWarnings, exposedSecretWarning } from '../util/secrets.js';
import { RbdClient } from './rbd.js';

/** Options every command accepts (see main.ts). */
export interface GlobalOptions {
  repo?: string;
  config?: string;
  passphraseFile?: string;
  keyFile?: string;
  debug?: boolean;
  json?: boolean;
  /** Secrets of a copy destination and of new key slots (see secretSource). */
  toKeyFile?: string;
  toPassphraseFile?: string;
  newKeyFile?: string;
  newPassphraseFile?: string;
}

let cachedConfig: LoadedConfig | undefined;
/** The rbd command wrapper with the [ceph] settings of appliance.conf. */
export function rbdClient(opts: GlobalOptions): RbdClient {
  const c = config(opts).config.ceph;
  return new RbdClient({ conf: c.conf, keyring: c.keyring, id: c.id.replace(/^client\./, ''), cluster: c.cluster, timeoutSeconds: Math.max(1, Math.ceil(c.timeout / 1000)) });
}

export function config(opts: GlobalOptions): LoadedConfig {
  cachedConfig ??= loadConfig(opts.config);
  return cachedConfig;
}

/** --repo, then $BLOCKSAFE_REPO, then [repository] repo from the config file. */
export function repoLocation(opts: GlobalOptions): string {
  const repo = opts.repo ?? process.env.BLOCKSAFE_REPO ?? (config(opts).config.repository.repo || undefined);
  if (!repo) throw new UsageError('No repository given: use --repo PATH, set BLOCKSAFE_REPO, or set [repository] repo in the config file.');
  return repo;
}

function readSecretFile(file: string, what: string): Buffer {
  const warning = exposedSecretWarning(file, what);
  if (warning && !deferredWarnings.includes(warning)) deferredWarnings.push(warning);
  try {
    return readFileSync(file);
  } catch (err) {
    throw describeSystemError(err, `${what} ${file}`);
  }
}

/** Whose secret: the repository's, a copy destination's, or a new one (key add, key passwd). */
export type SecretRole = 'repository' | 'destination' | 'new';

const ROLE = {
  repository: { keyFile: 'keyFile', passFile: 'passphraseFile', env: 'BLOCKSAFE_PASSPHRASE', prompt: 'Passphrase', flag: '--key-file' },
  destination: { keyFile: 'toKeyFile', passFile: 'toPassphraseFile', env: 'BLOCKSAFE_TO_PASSPHRASE', prompt: 'Passphrase of the destination repository', flag: '--to-key-file' },
  new: { keyFile: 'newKeyFile', passFile: 'newPassphraseFile', env: 'BLOCKSAFE_NEW_PASSPHRASE', prompt: 'New passphrase', flag: '--new-key-file' },
} as const;

/**
 * Where a secret comes from: its key-file option, its passphrase-file option, its environment variable
 * (BLOCKSAFE_PASSPHRASE, BLOCKSAFE_TO_PASSPHRASE, BLOCKSAFE_NEW_PASSPHRASE), then a prompt on the terminal.
 */
/** Asks the user for a secret on a terminal; `hint` says how to give it without asking. */
export type PromptFn = (prompt: string, hint?: string) => string;

export function secretSource(opts: GlobalOptions, confirm = false, role: SecretRole = 'repository', prompt?: PromptFn): SecretSource {
  const r = ROLE[role];
  const source: SecretSource = async (): Promise<Secret> => {
    const keyFile = opts[r.keyFile];
    const passFile = opts[r.passFile];
    if (keyFile) {
      const value = readSecretFile(keyFile, 'Key file');
      if (value.length < 32) throw new UsageError(`Key file ${keyFile} is too short (${value.length} bytes); use at least 32 random bytes, e.g. head -c 64 /dev/urandom > key.`);
      return { type: 'keyfile', value };
    }
    let pass: string;
    if (passFile)
      pass = readSecretFile(passFile, 'Passphrase file')
        .toString('utf8')
        .replace(/\r?\n$/, '');
    else if (process.env[r.env] !== undefined) pass = process.env[r.env]!;
    else {
      if (!prompt || (!process.stdin.isTTY && !existsSync('/dev/tty')))
        throw new UsageError(`${r.prompt} needed but there is no terminal to ask on; set ${r.env}, or use ${r.flag} or the matching passphrase-file option.`);
      pass = prompt(`${r.prompt}: `, `set ${r.env}, or use ${r.flag} or the matching passphrase-file option`);
      if (confirm && prompt(`${r.prompt} (again): `) !== pass) throw new UsageError('The two passphrases differ; nothing was changed.');
    }
    if (pass.length === 0) throw new UsageError('The passphrase is empty.');
    return { type: 'passphrase', value: Buffer.from(pass, 'utf8') };
  };
  // Given on purpose (not merely asked for): a repository claiming to be unencrypted is then refused.
  source.explicit = !!(opts[r.keyFile] || opts[r.passFile] || process.env[r.env] !== undefined);
  return source;
}

/** How repositories are opened with this configuration: lock timings, and where this machine keeps trust records. */
export function openOptions(opts: GlobalOptions): OpenOptions {
  const c = config(opts).config;
  return {
    locks: { refreshMs: c.locks.refresh, staleMs: c.locks.stale_after, waitMs: c.locks.wait },
    trustDir: path.join(s3Settings(c.s3).stateDir, 'trust'),
  };
}

/** Prints what the index sync with the store found that a user must know (one line each, on stderr). */
export function reportSync(r: SyncReport | null, quiet = false): void {
  if (!r || quiet) return;
  const note = (text: string) => process.stderr.write(`blocksafe: note: ${text}\n`);
  for (const v of r.vanished) note(`version ${v.id} (${v.name}) is no longer in the store (removed on another machine, or its manifest was deleted); it was dropped from the index.`);
  for (const d of r.damaged_manifests) note(`the manifest of version ${d.id} is damaged in the store and was not used (${d.reason}).`);
  for (const id of r.missing_manifests) note(`version ${id}, which this machine saw before, has no manifest in the store (removed on another machine, or its manifest was deleted).`);
  const restored = r.rolled_back.filter((id) => !r.protected_after_rollback.includes(id));
  if (restored.length) note(`the attributes of ${restored.join(', ')} in the store were older than the index's (put back by someone?); the index's were written again.`);
  if (r.protected_after_rollback.length)
    note(
      `the attributes of ${r.protected_after_rollback.join(', ')} in the store are older than ones this machine saw (put back by someone?); the newer state is unknown, so they are now protected: check them, then "blocksafe unprotect" if that is wrong.`,
    );
  if (r.foreign_names.length) note(`${r.foreign_names.length} objects in manifests/ are not blocksafe manifests and were ignored (e.g. ${r.foreign_names[0]}).`);
  if (r.missing_blocks) note(`${r.missing_blocks} blocks named by manifests are missing from the store; their versions are marked invalid.`);
}

/** Opens the repository at `location` (e.g. a copy destination) with the same configuration. */
export async function openRepositoryAt(opts: GlobalOptions, location: string, secret: SecretSource, quiet = false): Promise<Repository> {
  const store = openStore(location, config(opts).config.s3);
  const options = openOptions(opts);
  let repo: Repository | undefined;
  try {
    // A read-only USB disk at 3 a.m. must still restore: its index is rebuilt in a temporary directory.
    if (store instanceof DirectoryStore && existsSync(store.root) && !store.writable()) {
      if (!quiet) process.stderr.write(`blocksafe: note: ${store.root} is read-only; using a temporary index rebuilt from the repository (reading and restoring work, changes do not).\n`);
      repo = await openWithTemporaryIndex(store, secret, options);
    } else {
      repo = await Repository.open(store, secret, indexDirFor(store), options);
      // The index is a cache of the store: brought in line before anything relies on it.
      repo.syncReport = await syncIndex(repo);
    }
    reportSync(repo.syncReport, quiet);
    return repo;
  } catch (err) {
    if (repo) await repo.close().catch(() => undefined);
    else await store.close().catch(() => undefined);
    throw err;
  }
}

/** The store and index location of --repo, without unlocking anything (index rebuild). */
export function storeOf(opts: GlobalOptions): { store: ReturnType<typeof openStore>; indexDir: (id: string) => string } {
  const store = openStore(repoLocation(opts), config(opts).config.s3);
  return { store, indexDir: indexDirFor(store) };
}

export interface PipelineSettings {
  threads: number;
  queueDepth: number;
  direct: boolean;
  readThrottle: Throttle;
  writeThrottle: Throttle;
}

export function pipelineSettings(opts: GlobalOptions): PipelineSettings {
  const c = config(opts).config.pipeline;
  const threads = c.threads || defaultThreads();
  return {
    threads,
    queueDepth: c.queue_depth || threads + 2,
    direct: c.direct_io,
    readThrottle: new Throttle(c.read_limit),
    writeThrottle: new Throttle(c.write_limit),
  };
}
