/**
 * The CLI's access to repositories: everything in engine/session.ts, with the passphrase asked on the
 * terminal when no key file, passphrase file or environment variable gives it.
 */
import { BlockPipeline } from '../engine/blockPipeline.js';
import type { Repository, SecretSource } from '../engine/repository.js';
import { openRepositoryAt, pipelineSettings, repoLocation, secretSource as sessionSecretSource, type GlobalOptions, type PipelineSettings, type SecretRole } from '../engine/session.js';
import { promptHidden } from './prompt.js';

export * from '../engine/session.js';

export function secretSource(opts: GlobalOptions, confirm = false, role: SecretRole = 'repository'): SecretSource {
  return sessionSecretSource(opts, confirm, role, promptHidden);
}

export async function openRepository(opts: GlobalOptions): Promise<Repository> {
  return openRepositoryAt(opts, repoLocation(opts), secretSource(opts));
}

/** Runs `fn` with an open repository and block pipeline, closing both whatever happens. */
export async function withPipeline<T>(opts: GlobalOptions, fn: (repo: Repository, pipeline: BlockPipeline, s: PipelineSettings) => Promise<T>): Promise<T> {
  const repo = await openRepository(opts);
  const settings = pipelineSettings(opts);
  let pipeline: BlockPipeline | undefined;
  try {
    pipeline = await BlockPipeline.start(repo, settings.threads, { storeRead: settings.readThrottle, storeWrite: settings.writeThrottle }, settings.queueDepth);
    return await fn(repo, pipeline, settings);
  } finally {
    await pipeline?.close();
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
