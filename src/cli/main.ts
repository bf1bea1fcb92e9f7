import { Command, CommanderError } from 'commander';
import { BlocksafeError, ExitCode } from '../errors.js';
import { deferredWarnings } from '../util/secrets.js';
import { VERSION } from '../version.js';

/**
 * The command modules, loaded only when needed (start-up time, issue 19): each pulls in the engine, lmdb and
 * more. A command line naming a command loads the one module that registers it; anything else (no command,
 * `help`, an unknown name) loads them all, so help and "unknown command" errors list everything.
 * test/cli-lazy.test.ts checks that this table names exactly what the modules register.
 */
type Registrar = { register(program: Command): void };
export const COMMAND_MODULES: Readonly<Record<string, { commands: readonly string[]; load: () => Promise<Registrar> }>> = {
  init: { commands: ['init'], load: () => import('./commands/init.js') },
  backup: { commands: ['backup'], load: () => import('./commands/backup.js') },
  restore: { commands: ['restore'], load: () => import('./commands/restore.js') },
  versions: { commands: ['ls', 'show', 'stats', 'rm'], load: () => import('./commands/versions.js') },
  lifecycle: { commands: ['tag', 'protect', 'unprotect', 'expire', 'prune', 'cleanup'], load: () => import('./commands/lifecycle.js') },
  integrity: { commands: ['scrub', 'du', 'check'], load: () => import('./commands/integrity.js') },
  recovery: { commands: ['index', 'export', 'import', 'copy'], load: () => import('./commands/recovery.js') },
  keys: { commands: ['key', 'rekey'], load: () => import('./commands/keys.js') },
  nbd: { commands: ['nbd'], load: () => import('./commands/nbd.js') },
  mount: { commands: ['mount'], load: () => import('./commands/mount.js') },
  config: { commands: ['config'], load: () => import('./commands/config.js') },
  // The Ink UI: its module is small and loads ink/react itself, only when `ui` runs.
  ui: { commands: ['ui'], load: () => import('./commands/ui.js') },
};

/** Global options that take a value (so the word after them is not a command name). */
const VALUE_OPTIONS = new Set(['-r', '--repo', '-c', '--config', '--passphrase-file', '--key-file']);

/** The module keys a command line needs: the one registering its command, or all of them. */
export function modulesFor(argv: readonly string[]): string[] {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') break;
    if (a.startsWith('-')) {
      if (VALUE_OPTIONS.has(a)) i++;
      continue;
    }
    const key = Object.keys(COMMAND_MODULES).find((k) => COMMAND_MODULES[k]!.commands.includes(a));
    return key ? [key] : Object.keys(COMMAND_MODULES);
  }
  // No command: `--version` needs none, everything else (help, usage error) lists them all.
  return argv.some((a) => a === '-V' || a === '--version') ? [] : Object.keys(COMMAND_MODULES);
}

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

/** The program with the commands of `modules` (default: all; see modulesFor). */
export async function buildProgram(modules: readonly string[] = Object.keys(COMMAND_MODULES)): Promise<Command> {
  const registrars = await Promise.all(modules.map((m) => COMMAND_MODULES[m]!.load()));
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
  for (const r of registrars) r.register(program);
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
  const debug = argv.includes('--debug');
  try {
    const program = await buildProgram(modulesFor(argv));
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
    if ((err as { blocksafeNative?: boolean })?.blocksafeNative) {
      // The single executable's addon loader (build/runtime/native.mjs): its message is the one line to show.
      process.stderr.write(`blocksafe: ${(err as Error).message}\n`);
      if (debug) process.stderr.write(`${(err as Error).stack}\n`);
      return ExitCode.failure;
    }
    process.stderr.write(`blocksafe: unexpected error: ${(err as Error)?.message ?? String(err)} (run with --debug for details; please report it)\n`);
    if (debug) process.stderr.write(`${(err as Error)?.stack}\n`);
    return ExitCode.failure;
  }
}
