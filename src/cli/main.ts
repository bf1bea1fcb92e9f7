import { Command, CommanderError } from 'commander';
import { BlocksafeError, ExitCode } from '../errors.js';
import { deferredWarnings } from '../util/secrets.js';
import { VERSION } from '../version.js';
import { register as registerBackup } from './commands/backup.js';
import { register as registerConfig } from './commands/config.js';
import { register as registerInit } from './commands/init.js';
import { register as registerIntegrity } from './commands/integrity.js';
import { register as registerKeys } from './commands/keys.js';
import { register as registerLifecycle } from './commands/lifecycle.js';
import { register as registerRecovery } from './commands/recovery.js';
import { register as registerNbd } from './commands/nbd.js';
import { register as registerRestore } from './commands/restore.js';
import { register as registerVersions } from './commands/versions.js';
import { register as registerUi } from './commands/ui.js';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

export function buildProgram(): Command {
  const program = new Command('blocksafe')
    .description('Deduplicating, compressing, encrypting block-level backup of disks, LVM volumes and images.')
    .version(VERSION, '-V, --version')
    .option('-r, --repo <path>', 'repository: a directory or s3://bucket/prefix (or $BLOCKSAFE_REPO, or [repository] repo in the config)')
    .option('-c, --config <file>', 'configuration file (default $BLOCKSAFE_CONFIG, then /etc/blocksafe/appliance.conf)')
    .option('--passphrase-file <file>', 'read the passphrase from this file (or set BLOCKSAFE_PASSPHRASE)')
    .option('--key-file <file>', 'unlock with a key file instead of a passphrase')
    .option('--debug', 'show stack traces of errors')
    // Usage errors follow the error contract: one line, "blocksafe: " first (subcommands inherit this).
    .configureOutput({ outputError: (str, write) => write(`blocksafe: ${str.replace(/^error: /, '').trim()} (see "blocksafe --help").\n`) })
    .exitOverride();
  for (const register of [registerInit, registerBackup, registerRestore, registerVersions, registerLifecycle, registerIntegrity, registerRecovery, registerKeys, registerNbd, registerConfig]) register(program);
  registerUi(program); // the Ink UI: loads ink/react lazily, only when `ui` runs
  // Usage errors of every (sub)command reach main() instead of exiting on their own.
  const override = (c: Command): void => {
    c.exitOverride();
    c.commands.forEach(override);
  };
  override(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  // Indexes, state, exports and restored files hold names, tags, block maps and data: owner only.
  process.umask(0o077);
  const program = buildProgram();
  const debug = argv.includes('--debug');
  try {
    await program.parseAsync(argv, { from: 'user' });
    for (const w of deferredWarnings.splice(0)) process.stderr.write(w);
    return Number(process.exitCode ?? 0);
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return ExitCode.ok;
      return ExitCode.usage; // commander already printed the message
    }
    if (err instanceof BlocksafeError) {
      process.stderr.write(`blocksafe: ${err.message}\n`);
      if (debug) process.stderr.write(`${err.stack}\n${err.cause instanceof Error ? `caused by: ${err.cause.stack}\n` : ''}`);
      return err.exitCode;
    }
    process.stderr.write(`blocksafe: unexpected error: ${(err as Error)?.message ?? String(err)} (run with --debug for details; please report it)\n`);
    if (debug) process.stderr.write(`${(err as Error)?.stack}\n`);
    return ExitCode.failure;
  }
}
