import type { Command } from 'commander';
import { backup } from '../../engine/backup.js';
import { formatBytes } from '../../util/size.js';
import { formatDuration } from '../../util/time.js';
import { withPipeline, type GlobalOptions } from '../context.js';
import { printJson, versionJson } from '../output.js';
import { progressReporter } from '../progressLine.js';

interface BackupOptions extends GlobalOptions {
  snapshotName?: string;
  tag?: string[];
}

export function register(program: Command): void {
  program
    .command('backup')
    .description('back up a file or block device (path or file:// URI) as a new version of NAME')
    .argument('<source>', 'file, block device, or file:// URI')
    .argument('<name>', 'volume name the version belongs to')
    .option('-s, --snapshot-name <name>', 'free-form snapshot name stored with the version')
    .option('-t, --tag <tag...>', 'tags for the new version')
    .option('--json', 'print the new version as JSON')
    .action(async (source: string, name: string, _opts: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<BackupOptions>();
      const progress = progressReporter(!opts.json);
      const version = await withPipeline(opts, (repo, pipeline, s) =>
        backup(repo, pipeline, { source, name, snapshotName: opts.snapshotName, tags: opts.tag, queueDepth: s.queueDepth, onProgress: progress.listener }),
      );
      progress.done();
      if (opts.json) return printJson(versionJson(version));
      const st = version.stats;
      process.stderr.write(
        `Backed up ${formatBytes(version.size)} in ${formatDuration(st.duration_ms)}: read ${formatBytes(st.bytes_read)}, ` +
          `wrote ${formatBytes(st.bytes_written)} (${st.blocks_written} new blocks), deduplicated ${formatBytes(st.bytes_deduplicated)}, sparse ${formatBytes(st.bytes_sparse)}.\n`,
      );
      process.stdout.write(`${version.id}\n`);
    });
}
