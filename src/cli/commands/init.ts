import type { Command } from 'commander';
import { UsageError } from '../../errors.js';
import { indexDirFor, openStore, Repository, type Descriptor } from '../../engine/repository.js';
import { prepareStoreForInit } from '../../store/s3.js';
import { parseSize } from '../../util/size.js';
import { config, repoLocation, secretSource, type GlobalOptions } from '../context.js';
import { printJson } from '../output.js';

interface InitOptions extends GlobalOptions {
  encryption?: string;
  compression?: string;
  blockSize?: string;
  createBucket?: boolean;
}

export function register(program: Command): void {
  program
    .command('init')
    .description('create a repository (asks for a passphrase twice, or uses --key-file)')
    .option('--encryption <mode>', 'chacha20-poly1305 (default) or none')
    .option('--compression <mode>', 'zstd (default) or none')
    .option('--block-size <size>', 'block size, e.g. 4M (default from the config)')
    .option('--create-bucket', 'S3: create the bucket when it does not exist (an existing bucket is used as it is)')
    .option('--json', 'print the result as JSON')
    .action(async (_opts: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<InitOptions>();
      const c = config(opts).config.init;
      const encryption = (opts.encryption ?? c.encryption) as Descriptor['encryption'];
      if (!['chacha20-poly1305', 'none'].includes(encryption)) throw new UsageError(`Unknown encryption "${encryption}": use chacha20-poly1305 or none.`);
      const compression = (opts.compression ?? c.compression) as Descriptor['compression'];
      if (!['zstd', 'none'].includes(compression)) throw new UsageError(`Unknown compression "${compression}": use zstd or none.`);
      const blockSize = opts.blockSize ? parseSize(opts.blockSize, 'block size') : c.block_size;
      const store = openStore(repoLocation(opts), config(opts).config.s3);
      await prepareStoreForInit(store, !!opts.createBucket);
      const secret = encryption === 'none' ? undefined : await secretSource(opts, true)();
      const repo = await Repository.init(store, { encryption, compression, compressionLevel: c.compression_level, blockSize, secret }, indexDirFor(store));
      try {
        if (opts.json) printJson({ location: store.location, ...repo.descriptor });
        else process.stdout.write(`Created repository ${repo.id} at ${store.location} (block size ${blockSize}, encryption ${encryption}, compression ${compression}).\n`);
      } finally {
        await repo.close();
      }
    });
}
