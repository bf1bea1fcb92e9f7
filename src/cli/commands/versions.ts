import type { Command } from 'commander';
import { assertRemovable, removeVersions } from '../../engine/remove.js';
import { listVersions, repositoryStats } from '../../engine/versions.js';
import { formatBytes } from '../../util/size.js';
import { displayLocal, formatDuration } from '../../util/time.js';
import { assertOldEnough } from '../../engine/lifecycle.js';
import { config, withRepository, type GlobalOptions } from '../context.js';
import { keyValueTable, printJson, statusOf, versionJson, versionsTable } from '../output.js';

interface LsOptions extends GlobalOptions {
  tag?: string;
  snapshotName?: string;
  valid?: boolean;
  invalid?: boolean;
  expired?: boolean;
}

export function register(program: Command): void {
  program
    .command('ls')
    .description('list versions, newest first')
    .argument('[name]', 'only versions of this volume name')
    .option('-t, --tag <tag>', 'only versions with this tag')
    .option('-s, --snapshot-name <name>', 'only versions with this snapshot name')
    .option('--valid', 'only valid versions')
    .option('--invalid', 'only invalid versions')
    .option('--expired', 'only versions whose expiry date has passed')
    .option('--json', 'print a JSON array')
    .action(async (name: string | undefined, _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<LsOptions>();
      await withRepository(opts, async (repo) => {
        const versions = listVersions(repo, {
          name,
          tag: opts.tag,
          snapshotName: opts.snapshotName,
          valid: opts.valid ? true : opts.invalid ? false : undefined,
          expired: opts.expired ? true : undefined,
        });
        if (opts.json) printJson(versions.map(versionJson));
        else process.stdout.write(versions.length ? versionsTable(versions) + '\n' : 'No versions.\n');
      });
    });

  program
    .command('show')
    .description('show one version in full, with its statistics')
    .argument('<version>', 'version id or unique prefix')
    .option('--json', 'print JSON')
    .action(async (ref: string, _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      await withRepository(opts, (repo) => {
        const v = repo.index.resolveVersion(ref);
        if (opts.json) return printJson(versionJson(v));
        const s = v.stats;
        process.stdout.write(
          keyValueTable([
            ['id', v.id],
            ['name', v.name],
            ['snapshot name', v.snapshot_name],
            ['date', displayLocal(new Date(v.date))],
            ['size', `${formatBytes(v.size)} (${v.size} bytes)`],
            ['block size', formatBytes(v.block_size)],
            ['status', statusOf(v)],
            ['tags', v.tags.join(', ')],
            ['expires', v.expire ? displayLocal(new Date(v.expire)) : 'never'],
            ['source', v.source],
            ['base version', v.base ?? ''],
            ['read', `${formatBytes(s.bytes_read)} (${s.blocks_read} blocks)`],
            ['written', `${formatBytes(s.bytes_written)} (${s.blocks_written} new blocks)`],
            ['deduplicated', `${formatBytes(s.bytes_deduplicated)} (${s.blocks_deduplicated} blocks)`],
            ['sparse', `${formatBytes(s.bytes_sparse)} (${s.blocks_sparse} blocks)`],
            ['referenced from base', `${s.blocks_referenced} blocks`],
            ['duration', formatDuration(s.duration_ms)],
          ]) + '\n',
        );
      });
    });

  program
    .command('stats')
    .description('what each backup read, wrote, deduplicated and skipped as sparse, and repository totals')
    .argument('[version]', 'only this version')
    .option('--json', 'print JSON')
    .action(async (ref: string | undefined, _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      await withRepository(opts, (repo) => {
        const versions = ref ? [repo.index.resolveVersion(ref)] : listVersions(repo);
        const totals = repositoryStats(repo);
        if (opts.json) return printJson({ repository: totals, versions: versions.map((v) => ({ id: v.id, name: v.name, date: versionJson(v).date, ...v.stats })) });
        for (const v of versions) {
          const s = v.stats;
          process.stdout.write(
            `${v.id} ${v.name} ${displayLocal(new Date(v.date))}: read ${formatBytes(s.bytes_read)}, wrote ${formatBytes(s.bytes_written)}, ` +
              `deduplicated ${formatBytes(s.bytes_deduplicated)}, sparse ${formatBytes(s.bytes_sparse)}, ${formatDuration(s.duration_ms)}\n`,
          );
        }
        process.stdout.write(
          `repository: ${totals.versions} versions (${totals.versions_incomplete} incomplete, ${totals.versions_invalid} invalid), ` +
            `${totals.blocks} blocks (${totals.blocks_invalid} invalid), ${formatBytes(totals.unique_bytes)} unique data stored in ${formatBytes(totals.stored_bytes)}, ` +
            `${formatBytes(totals.logical_bytes)} in all versions\n`,
        );
      });
    });

  program
    .command('rm')
    .description('remove versions from the repository (their space is freed by a later cleanup)')
    .argument('<version...>', 'version ids or unique prefixes')
    .option('-f, --force', 'also remove versions younger than [lifecycle] min_age_days (protected versions never: unprotect them first)')
    .option('--json', 'print JSON')
    .action(async (refs: string[], _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions & { force?: boolean }>();
      await withRepository(opts, async (repo) => {
        // Resolve everything first, so a typo in the third id removes nothing.
        const versions = refs.map((r) => repo.index.resolveVersion(r));
        const minAge = config(opts).config.lifecycle.min_age_days;
        for (const v of versions) {
          assertRemovable(v);
          assertOldEnough(v, minAge, !!opts.force);
        }
        await removeVersions(repo, versions);
        if (opts.json) printJson({ removed: versions.map((v) => v.id) });
        else for (const v of versions) process.stdout.write(`Removed version ${v.id} (${v.name}).\n`);
      });
    });
}
