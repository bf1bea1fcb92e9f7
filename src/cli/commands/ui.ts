import type { Command } from 'commander';
import type { GlobalOptions } from '../context.js';

export function register(program: Command): void {
  program
    .command('ui')
    .description('interactive terminal UI: browse versions, restore (with typed confirmation), scrub')
    // `blocksafe ui --help` must say how to name the repository (--repo, --config …).
    .configureHelp({ showGlobalOptions: true })
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      // Ink does not repaint when it believes it runs in CI; on a real terminal it must.
      if (process.stdout.isTTY) {
        delete process.env.CI;
        delete process.env.CONTINUOUS_INTEGRATION;
      }
      // Loaded only here: no other command pays for ink and react (nor needs them in the single executable).
      const { runUi } = await import('../../../ui/App.js');
      const code = await runUi(opts);
      // The repository is closed and the record printed. Blocks that were in flight when a restore was stopped
      // may still wait for a bandwidth limit before failing on the closed target: do not wait for them.
      process.exit(code);
    });
}
