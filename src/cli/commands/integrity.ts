import type { Command } from 'commander';
import { ExitCode, UsageError } from '../../errors.js';
import { scrub } from '../../engine/scrub.js';
import { checkConsistency, diskUsage } from '../../engine/space.js';
import { formatBytes } from '../../util/size.js';
import { displayLocal } from '../../util/time.js';
import { rbdClient, withPipeline, withRepository, type GlobalOptions } from '../context.js';
import { printJson } from '../output.js';
import { progressReporter } from '../progressLine.js';

interface ScrubCliOptions extends GlobalOptions {
  all?: boolean;
  percent?: string;
  source?: string;
}

export function register(program: Command): void {
  program
    .command('scrub')
    .description('re-read stored blocks, verify them, and mark damaged blocks and their versions invalid')
    .argument('[version...]', 'versions to scrub (ids or unique prefixes)')
    .option('--all', 'scrub every block of the repository')
    .option('-p, --percent <n>', 'only the N % of blocks verified longest ago (repeated runs cover everything)')
    .option('--source <uri>', 'deep scrub: also compare the version with its live source (a path, or rbd://POOL/IMAGE[@SNAP])')
    .option('--json', 'print the result as JSON')
    .action(async (refs: string[], _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<ScrubCliOptions>();
      if (!opts.all && refs.length === 0) throw new UsageError('Name the versions to scrub, or use --all.');
      if (opts.all && refs.length > 0) throw new UsageError('Use either --all or version ids, not both.');
      const percent = opts.percent === undefined ? undefined : Number(opts.percent);
      if (percent !== undefined && !(percent > 0 && percent <= 100)) throw new UsageError(`--percent must be a number between 0 and 100 (got "${opts.percent}").`);
      const progress = progressReporter(!opts.json);
      const result = await withPipeline(opts, (repo, pipeline, s) =>
        scrub(repo, pipeline, {
          versions: refs.map((r) => repo.index.resolveVersion(r)),
          percent,
          source: opts.source,
          rbd: opts.source?.startsWith('rbd://') ? rbdClient(opts) : undefined,
          queueDepth: s.queueDepth,
          direct: s.direct,
          onProgress: progress.listener,
        }),
      );
      progress.done();
      if (opts.json) printJson(result);
      else {
        const out = process.stdout;
        out.write(`Scrubbed ${result.blocks_checked} of ${result.blocks_selected} blocks (${formatBytes(result.bytes_checked)}): ${result.damaged.length} damaged.\n`);
        if (percent !== undefined) {
          out.write(`At ${percent} % per run a full cycle takes ${Math.ceil(100 / percent)} runs; ${result.blocks_due} blocks are still due in this cycle.\n`);
        }
        for (const d of result.damaged) out.write(`DAMAGED block ${d.checksum.slice(0, 16)}…: ${d.reason}\n`);
        if (result.invalidated_versions.length)
          out.write(`Versions now INVALID: ${result.invalidated_versions.join(', ')} (still restorable except the damaged blocks; the next backup re-stores them).\n`);
        if (result.revalidated_versions.length) out.write(`Versions valid again: ${result.revalidated_versions.join(', ')}.\n`);
        for (const d of result.source_differences) out.write(`differs from the source: block ${d.block} (offset ${d.offset}, ${d.length} bytes)\n`);
        if (opts.source && result.source_differences.length === 0) out.write('The version equals the live source.\n');
      }
      if (result.damaged.length > 0) process.exitCode = ExitCode.integrity;
    });

  program
    .command('du')
    .description('space per version: referenced, shared, and exclusive (freed by removing it and a cleanup)')
    .option('--json', 'print JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      await withRepository(opts, (repo) => {
        const du = diskUsage(repo);
        if (opts.json) return printJson(du);
        for (const v of du.versions) {
          process.stdout.write(
            `${v.id} ${v.name} ${displayLocal(new Date(v.date))}: size ${formatBytes(v.size)}, stored ${formatBytes(v.referenced_bytes)} ` +
              `(exclusive ${formatBytes(v.exclusive_bytes)}, shared ${formatBytes(v.shared_bytes)})\n`,
          );
        }
        process.stdout.write(`total stored ${formatBytes(du.stored_bytes)}, unreferenced ${formatBytes(du.unreferenced_bytes)} (freed by cleanup)\n`);
      });
    });

  program
    .command('check')
    .description('cheap consistency check of index against store (lists objects, reads none)')
    .option('--json', 'print JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      const report = await withRepository(opts, (repo) => checkConsistency(repo));
      if (opts.json) printJson(report);
      else {
        process.stdout.write(`${report.blocks_in_index} blocks in the index, ${report.objects_in_store} objects in the store.\n`);
        for (const m of report.missing_objects) process.stdout.write(`MISSING object for block ${m}\n`);
        if (report.unknown_objects.length) process.stdout.write(`${report.unknown_objects.length} objects unknown to the index (removed by cleanup, or run "index rebuild").\n`);
      }
      if (report.missing_objects.length > 0) process.exitCode = ExitCode.integrity;
    });
}
