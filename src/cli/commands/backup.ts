import type { Command } from 'commander';
import { backupSource } from '../../engine/backupSource.js';
import { readHintsFile } from '../../engine/hints.js';
import type { VersionRecord } from '../../index/records.js';
import { formatBytes } from '../../util/size.js';
import { formatDuration } from '../../util/time.js';
import { config, rbdClient, withPipeline, type GlobalOptions } from '../context.js';
import { printJson, versionJson } from '../output.js';
import { progressReporter } from '../progressLine.js';
import { askYesNo } from '../prompt.js';

interface BackupOptions extends GlobalOptions {
  snapshotName?: string;
  tag?: string[];
  from?: string;
  hints?: string;
  resume?: boolean;
}

export function register(program: Command): void {
  program
    .command('backup')
    .description('back up a file or block device (path or file:// URI) as a new version of NAME')
    .argument('<source>', 'file, block device, file:// URI, lvm://VG/LV (snapshotted for the backup), or rbd://POOL/IMAGE[@SNAP] (Ceph RBD)')
    .argument('<name>', 'volume name the version belongs to')
    .option('-s, --snapshot-name <name>', 'free-form snapshot name stored with the version')
    // One value per --tag (repeat it for several): a variadic option would swallow SOURCE and NAME.
    .option('-t, --tag <tag>', 'a tag for the new version (repeat for several)', (value: string, previous: string[] = []) => [...previous, value])
    .option('--from <version>', 'base version (default: the newest complete version of NAME)')
    .option('--hints <file>', 'rbd-diff style JSON of changed extents since --from: only those are read')
    .option('--resume', 'continue the interrupted backup of NAME')
    .option('--json', 'print the new version as JSON')
    .action(async (source: string, name: string, _opts: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<BackupOptions>();
      const hints = opts.hints ? readHintsFile(opts.hints) : null;
      const progress = progressReporter(!opts.json);
      const version = await withPipeline(opts, async (repo, pipeline, s) => {
        const from = opts.from ? repo.index.resolveVersion(opts.from) : undefined;
        const common = {
          name,
          tags: opts.tag,
          queueDepth: s.queueDepth,
          direct: s.direct,
          autoTags: config(opts).config.lifecycle.auto_tags,
          readThrottle: s.readThrottle,
          onProgress: progress.listener,
        };
        return backupSource(repo, pipeline, {
          ...common,
          source,
          snapshotName: opts.snapshotName,
          from,
          hints,
          resume: !!opts.resume,
          offerResume: (v) => offerResume(v, name, !!opts.json),
          snapshotSize: config(opts).config.lvm.snapshot_size,
          rbd: () => rbdClient(opts),
          warn: (m) => process.stderr.write(`blocksafe: note: ${m}\n`),
        });
      });
      progress.done();
      if (opts.json) return printJson(versionJson(version));
      const st = version.stats;
      process.stderr.write(
        `Backed up ${formatBytes(version.size)} in ${formatDuration(st.duration_ms)}: read ${formatBytes(st.bytes_read)}, ` +
          `wrote ${formatBytes(st.bytes_written)} (${st.blocks_written} new blocks), deduplicated ${formatBytes(st.bytes_deduplicated)}` +
          `${st.blocks_referenced ? ` (${st.blocks_referenced} blocks taken from ${version.base} unread)` : ''}, sparse ${formatBytes(st.bytes_sparse)}.\n`,
      );
      process.stdout.write(`${version.id}\n`);
    });
}

/** Offers to continue an interrupted backup on a terminal; elsewhere notes it and starts anew. */
function offerResume(v: VersionRecord, name: string, json: boolean): boolean {
  const pct = Math.floor((100 * v.blocks_done * v.block_size) / Math.max(1, v.size));
  const question = `An interrupted backup of "${name}" exists (version ${v.id}, ${Math.min(100, pct)} % done). Resume it instead of starting over?`;
  if (!json && askYesNo(question)) return true;
  if (!process.stdin.isTTY) process.stderr.write(`blocksafe: note: an interrupted backup of "${name}" exists (version ${v.id}); use --resume to continue it. Starting a new backup.\n`);
  return false;
}
