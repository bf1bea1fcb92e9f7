import type { Command } from 'commander';
import { formatConfig, maskSecrets } from '../../config/config.js';
import { config, type GlobalOptions } from '../context.js';
import { printJson } from '../output.js';

export function register(program: Command): void {
  program
    .command('config')
    .description('print the effective configuration (defaults plus the config file)')
    .option('--json', 'print JSON')
    .action((_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      const loaded = config(opts);
      if (opts.json) printJson({ file: loaded.file, config: maskSecrets(loaded.config) });
      else process.stdout.write(formatConfig(loaded));
    });
}
