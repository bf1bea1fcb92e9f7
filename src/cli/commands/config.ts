import type { Command } from 'commander';
import { exampleConfig, formatConfig, maskSecrets } from '../../config/config.js';
import { config, type GlobalOptions } from '../context.js';
import { printJson } from '../output.js';

export function register(program: Command): void {
  program
    .command('config')
    .description('print the effective configuration (defaults plus the config file)')
    .option('--example', 'print a documented configuration file with every option at its default')
    .option('--json', 'print JSON')
    .action((_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions & { example?: boolean }>();
      if (opts.example) return void process.stdout.write(exampleConfig());
      const loaded = config(opts);
      if (opts.json) printJson({ file: loaded.file, config: maskSecrets(loaded.config), retention_by_name: loaded.retentionByName });
      else process.stdout.write(formatConfig(loaded));
    });
}
