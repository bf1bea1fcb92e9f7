import type { Command } from 'commander';
import { backup, newestComplete, newestIncomplete } from '../../engine/backup.js';
import { withLvmSource } from '../../engine/lvm.js';
import type { Repository } from '../../engine/repository.js';
import { NotFoundError, UsageError } from '../../errors.js';
import { readHintsFile } from '../../engine/hints.js';
import type { VersionRecord } from '../../index/records.js';
import { formatBytes } from '../../util/size.js';
import { formatDuration } from '../../util/time.js';
import { config, withPipeline, type GlobalOptions } from '../context.js';
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
    .argument('<source>', 'file, block device, file:// URI, or lvm://VG/LV (snapshotted for the backup)')
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
        if (!source.startsWith('lvm://')) {
          return backup(repo, pipeline, {
            ...common,
            source,
            snapshotName: opts.snapshotName,
            from,
            hints,
            resume: !!opts.resume,
            offerResume: (v) => offerResume(v, name, !!opts.json),
          });
        }
        // LVM: snapshot, back up the snapshot, remove it (thin: keep it as the base of tomorrow's hints).
        if (opts.snapshotName) throw new UsageError('--snapshot-name cannot be used with lvm:// sources: blocksafe names the snapshot it creates.');
        if (opts.hints) throw new UsageError('--hints cannot be used with lvm:// sources: thin volumes get their hints from thin_delta.');
        const previous = newestComplete(repo, name);
        const interrupted = opts.resume ? newestIncomplete(repo, name) : null;
        if (opts.resume && !interrupted) throw new NotFoundError(`There is no interrupted backup of "${name}" to resume; run the backup without --resume.`);
        return withLvmSource(
          source,
          { previousSnapshot: previous?.snapshot_name || null, snapshotSize: config(opts).config.lvm.snapshot_size, resumeSnapshot: interrupted?.snapshot_name || null },
          (src) => {
            // thin_delta hints are relative to the kept snapshot: only valid against the version taken from it.
            const base = src.hints ? baseBySnapshot(repo, name, src.baseSnapshot) : null;
            return backup(repo, pipeline, {
              ...common,
              source: src.devicePath,
              sourceLabel: source,
              snapshotName: src.snapshotName,
              from: base ?? from,
              hints: base ? src.hints : null,
              resume: !!interrupted,
            });
          },
        );
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

/** The newest complete version of `name` taken from the given snapshot. */
function baseBySnapshot(repo: Repository, name: string, snapshot: string | null): VersionRecord | null {
  if (!snapshot) return null;
  let best: VersionRecord | null = null;
  for (const v of repo.index.allVersions()) if (v.name === name && v.complete && v.snapshot_name === snapshot && (!best || v.date > best.date)) best = v;
  return best;
}
