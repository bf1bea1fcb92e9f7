import { readFileSync } from 'node:fs';
import { loadConfig, type LoadedConfig } from '../config/config.js';
import { describeSystemError, UsageError } from '../errors.js';
import { BlockPipeline } from '../engine/blockPipeline.js';
import { indexDirFor, openStore, Repository, type Secret, type SecretSource } from '../engine/repository.js';
import { defaultThreads } from '../engine/workerPool.js';
import { Throttle } from '../util/throttle.js';
import { promptHidden } from './prompt.js';

/** Options every command accepts (see main.ts). */
export interface GlobalOptions {
  repo?: string;
  config?: string;
  passphraseFile?: string;
  keyFile?: string;
  debug?: boolean;
  json?: boolean;
}

let cachedConfig: LoadedConfig | undefined;
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
  try {
    return readFileSync(file);
  } catch (err) {
    throw describeSystemError(err, `${what} ${file}`);
  }
}

/** Where the secret comes from: --key-file, --passphrase-file, BLOCKSAFE_PASSPHRASE, then a prompt. */
export function secretSource(opts: GlobalOptions, confirm = false): SecretSource {
  return async (): Promise<Secret> => {
    if (opts.keyFile) {
      const value = readSecretFile(opts.keyFile, 'Key file');
      if (value.length < 32) throw new UsageError(`Key file ${opts.keyFile} is too short (${value.length} bytes); use at least 32 random bytes, e.g. head -c 64 /dev/urandom > key.`);
      return { type: 'keyfile', value };
    }
    let pass: string;
    if (opts.passphraseFile) pass = readSecretFile(opts.passphraseFile, 'Passphrase file').toString('utf8').replace(/\r?\n$/, '');
    else if (process.env.BLOCKSAFE_PASSPHRASE !== undefined) pass = process.env.BLOCKSAFE_PASSPHRASE;
    else {
      pass = promptHidden('Passphrase: ');
      if (confirm && promptHidden('Passphrase (again): ') !== pass) throw new UsageError('The two passphrases differ; nothing was created.');
    }
    if (pass.length === 0) throw new UsageError('The passphrase is empty.');
    return { type: 'passphrase', value: Buffer.from(pass, 'utf8') };
  };
}

export async function openRepository(opts: GlobalOptions): Promise<Repository> {
  const store = openStore(repoLocation(opts));
  return Repository.open(store, secretSource(opts), indexDirFor(store));
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
    queueDepth: c.queue_depth || threads * 2 + 2,
    direct: c.direct_io,
    readThrottle: new Throttle(c.read_limit),
    writeThrottle: new Throttle(c.write_limit),
  };
}

/** Runs `fn` with an open repository and block pipeline, closing both whatever happens. */
export async function withPipeline<T>(opts: GlobalOptions, fn: (repo: Repository, pipeline: BlockPipeline, s: PipelineSettings) => Promise<T>): Promise<T> {
  const repo = await openRepository(opts);
  const settings = pipelineSettings(opts);
  const pipeline = BlockPipeline.start(repo, settings.threads, { storeRead: settings.readThrottle, storeWrite: settings.writeThrottle });
  try {
    return await fn(repo, pipeline, settings);
  } finally {
    await pipeline.close();
    await repo.close();
  }
}

export async function withRepository<T>(opts: GlobalOptions, fn: (repo: Repository) => Promise<T> | T): Promise<T> {
  const repo = await openRepository(opts);
  try {
    return await fn(repo);
  } finally {
    await repo.close();
  }
}
