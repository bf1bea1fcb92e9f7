import type { Command } from 'commander';
import { ExitCode, UsageError } from '../../errors.js';
import { restore } from '../../engine/restore.js';
import { formatBytes } from '../../util/size.js';
import { rbdClient, withPipeline, type GlobalOptions } from '../context.js';
import { restoreToRbd } from '../../engine/rbdRestore.js';
import { printJson } from '../output.js';
import { progressReporter } from '../progressLine.js';

interface RestoreOptions extends GlobalOptions {
  force?: boolean;
  sparse?: boolean;
  resume?: boolean;
  fillFrom?: string;
}

export function register(program: Command): void {
  program
    .command('restore')
    .description('restore a version to a file or block device')
    .argument('<version>', 'version id or unique prefix')
    .argument('<target>', 'file path (created with holes), block device, or rbd://POOL/IMAGE (created thin)')
    .option('-f, --force', 'overwrite an existing, non-empty target')
    .option('--sparse', 'do not write all-zero blocks (the target already reads as zeros, e.g. a fresh thin volume)')
    .option('--resume', 'continue an interrupted restore of this version to this target')
    .option('--fill-from <version>', 'take damaged blocks from this version where it has them intact (else they read as zeros)')
    .option('--json', 'print the result as JSON')
    .action(async (ref: string, target: string, _opts: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<RestoreOptions>();
      const progress = progressReporter(!opts.json);
      // ctrl-c, a closed terminal or a shutdown stop the restore after the blocks in flight, with a checkpoint
      // (so --resume continues from there); a second signal ends the process at once.
      const stop = new AbortController();
      const signals = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
      const onSignal = (sig: NodeJS.Signals) => {
        if (stop.signal.aborted) {
          for (const s of signals) process.off(s, onSignal);
          process.kill(process.pid, sig);
          return;
        }
        stop.abort();
      };
      for (const s of signals) process.on(s, onSignal);
      const result = await withPipeline(opts, (repo, pipeline, s) => {
        const options = {
          signal: stop.signal,
          fillFrom: opts.fillFrom ? repo.index.resolveVersion(opts.fillFrom) : undefined,
          target,
          force: !!opts.force,
          sparse: !!opts.sparse,
          resume: !!opts.resume,
          queueDepth: s.queueDepth,
          writeThrottle: s.writeThrottle,
          onProgress: progress.listener,
        };
        const version = repo.index.resolveVersion(ref);
        if (target.startsWith('rbd://') && opts.fillFrom) throw new UsageError('--fill-from is not available for rbd:// targets yet: damaged blocks of an RBD restore read as zeros.');
        return target.startsWith('rbd://') ? restoreToRbd(repo, pipeline, rbdClient(opts), version, options) : restore(repo, pipeline, version, options);
      }).finally(() => {
        for (const s of signals) process.off(s, onSignal);
      });
      progress.done();
      if (opts.json) {
        printJson({ version: result.version.id, target: result.target, size: result.version.size, bytes_written: result.bytesWritten, damaged: result.damaged });
      } else if (result.damaged.length === 0) {
        process.stderr.write(`Restored version ${result.version.id} (${formatBytes(result.version.size)}) to ${target}; every block verified.\n`);
      } else {
        process.stderr.write(`Restored version ${result.version.id} to ${target} with ${result.damaged.length} DAMAGED range(s), which read as zeros:\n`);
        for (const d of result.damaged) process.stderr.write(`  offset ${d.offset} length ${d.length}: ${d.reason}\n`);
      }
      if (result.damaged.length > 0) process.exitCode = ExitCode.integrity;
    });
}
