import type { Command } from 'commander';
import { ExitCode, LockedError, UsageError } from '../../errors.js';
import { cleanup } from '../../engine/cleanup.js';
import { addTags, parseDate, removeTags, setExpire, setProtected } from '../../engine/lifecycle.js';
import { describePolicy, planPrune, policyIsEmpty, type RetentionPolicy } from '../../engine/prune.js';
import { removeVersion } from '../../engine/remove.js';
import { listVersions } from '../../engine/versions.js';
import type { VersionRecord } from '../../index/records.js';
import { formatBytes, parseDuration } from '../../util/size.js';
import { displayLocal, formatDuration, isoLocal } from '../../util/time.js';
import { config, withRepository, type GlobalOptions } from '../context.js';
import { printJson, versionJson } from '../output.js';

export function register(program: Command): void {
  const tag = program.command('tag').description('add or remove tags of a version');
  tag
    .command('add')
    .argument('<version>')
    .argument('<tag...>')
    .option('--json', 'print the version as JSON')
    .action((ref: string, tags: string[], _o: unknown, cmd: Command) => bookkeeping(cmd, ref, (repo, v) => addTags(repo, v.id, tags)));
  tag
    .command('rm')
    .argument('<version>')
    .argument('<tag...>')
    .option('--json', 'print the version as JSON')
    .action((ref: string, tags: string[], _o: unknown, cmd: Command) => bookkeeping(cmd, ref, (repo, v) => removeTags(repo, v.id, tags)));
  program
    .command('protect')
    .description('protect a version from rm and prune')
    .argument('<version>')
    .option('--json', 'print the version as JSON')
    .action((ref: string, _o: unknown, cmd: Command) => bookkeeping(cmd, ref, (repo, v) => setProtected(repo, v.id, true)));
  program
    .command('unprotect')
    .description('remove the protection of a version')
    .argument('<version>')
    .option('--json', 'print the version as JSON')
    .action((ref: string, _o: unknown, cmd: Command) => bookkeeping(cmd, ref, (repo, v) => setProtected(repo, v.id, false)));
  program
    .command('expire')
    .description('set the date after which prune removes a version ("never" clears it)')
    .argument('<version>')
    .argument('<date>', 'YYYY-MM-DD, "YYYY-MM-DD HH:MM" (local time), ISO-8601, or never')
    .option('--json', 'print the version as JSON')
    .action((ref: string, date: string, _o: unknown, cmd: Command) => {
      const when = parseDate(date);
      return bookkeeping(cmd, ref, (repo, v) => setExpire(repo, v.id, when));
    });

  program
    .command('prune')
    .description('remove versions by retention policy, per volume name, in local time; never protected ones')
    .option('--keep-last <n>', 'keep the N newest versions')
    .option('--keep-hourly <n>', 'keep the newest version of each of the last N hours')
    .option('--keep-daily <n>', 'keep the newest version of each of the last N days')
    .option('--keep-weekly <n>', 'keep the newest version of each of the last N ISO weeks')
    .option('--keep-monthly <n>', 'keep the newest version of each of the last N months')
    .option('--keep-yearly <n>', 'keep the newest version of each of the last N years')
    .option('--name <name>', 'only versions of this volume name')
    .option('-n, --dry-run', 'print the plan, remove nothing')
    .option('--json', 'print the plan (and what was removed) as JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions & Record<string, string | boolean | undefined>>();
      const loaded = config(opts);
      const flags: Partial<RetentionPolicy> = {};
      for (const k of ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const) {
        const raw = opts[`keep${k[0]!.toUpperCase()}${k.slice(1)}`];
        if (raw === undefined) continue;
        if (typeof raw !== 'string' || !/^\d+$/.test(raw)) throw new UsageError(`--keep-${k} needs a whole number (got "${String(raw)}").`);
        flags[k] = Number(raw);
      }
      const policyFor = (name: string): RetentionPolicy => {
        const r = { ...loaded.config.retention, ...(loaded.retentionByName[name] ?? {}) };
        const fromConfig: RetentionPolicy = { last: r.keep_last, hourly: r.keep_hourly, daily: r.keep_daily, weekly: r.keep_weekly, monthly: r.keep_monthly, yearly: r.keep_yearly };
        return Object.keys(flags).length ? { last: 0, hourly: 0, daily: 0, weekly: 0, monthly: 0, yearly: 0, ...flags } : fromConfig;
      };
      await withRepository(opts, async (repo) => {
        const versions = listVersions(repo, { name: opts.name as string | undefined });
        const byName = new Map<string, VersionRecord[]>();
        for (const v of versions) byName.set(v.name, [...(byName.get(v.name) ?? []), v]);
        const plans = [...byName].map(([name, vs]) => ({ name, policy: policyFor(name), decisions: planPrune(vs, policyFor(name)) }));
        const empty = plans.filter((p) => policyIsEmpty(p.policy)).map((p) => p.name);
        if (empty.length) {
          throw new UsageError(`No retention policy for ${empty.map((n) => `"${n}"`).join(', ')}: give --keep-* options or set [retention] in the config; nothing was removed.`);
        }
        const removed: string[] = [];
        const skipped: { id: string; reason: string }[] = [];
        if (!opts.json) {
          for (const p of plans) {
            process.stdout.write(`${p.name} (policy: ${describePolicy(p.policy)})\n`);
            for (const d of p.decisions) {
              process.stdout.write(`  ${d.keep ? 'keep  ' : 'REMOVE'} ${d.version.id} ${displayLocal(new Date(d.version.date))}  ${d.reasons.join(', ')}\n`);
            }
          }
        }
        if (!opts.dryRun) {
          for (const p of plans) {
            for (const d of p.decisions) {
              if (d.keep) continue;
              try {
                await removeVersion(repo, d.version);
                removed.push(d.version.id);
              } catch (err) {
                // In use (a backup writing it, a restore or export reading it): the rest of the plan goes on.
                if (!(err instanceof LockedError)) throw err;
                skipped.push({ id: d.version.id, reason: err.message });
              }
            }
          }
        }
        if (opts.json) {
          printJson({
            dry_run: !!opts.dryRun,
            names: plans.map((p) => ({
              name: p.name,
              policy: p.policy,
              versions: p.decisions.map((d) => ({ id: d.version.id, date: isoLocal(new Date(d.version.date)), keep: d.keep, reasons: d.reasons })),
            })),
            removed,
            skipped,
          });
        } else {
          for (const s of skipped) process.stdout.write(`NOT removed ${s.id}: ${s.reason}\n`);
          process.stdout.write(opts.dryRun ? 'Dry run: nothing was removed.\n' : `Removed ${removed.length} versions; run "blocksafe cleanup" to free their space.\n`);
        }
        if (skipped.length > 0) process.exitCode = ExitCode.locked;
      });
    });

  program
    .command('cleanup')
    .description('free the space of blocks no version references (safe while backups run)')
    .option('--grace <duration>', 'how long a block must stay unreferenced before it is deleted (default from the config, 1h)')
    .option('--json', 'print the result as JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions & { grace?: string }>();
      const grace = opts.grace !== undefined ? parseDuration(opts.grace, 'grace period') : config(opts).config.cleanup.grace;
      const result = await withRepository(opts, (repo) => cleanup(repo, grace));
      if (opts.json) return printJson(result);
      process.stdout.write(
        `Deleted ${result.deleted} objects, freed ${formatBytes(result.bytes_freed)}; ${result.marked} newly unreferenced, ` +
          `${result.waiting} waiting for the grace period (${formatDuration(grace)}) to end, ${result.unmarked} referenced again.\n` +
          (result.sweep_postponed ? `Nothing was deleted this time: ${result.sweep_postponed}\n` : ''),
      );
    });
}

/** Runs a bookkeeping change on one version and prints the result. */
async function bookkeeping(cmd: Command, ref: string, fn: (repo: import('../../engine/repository.js').Repository, v: VersionRecord) => Promise<VersionRecord>): Promise<void> {
  const opts = cmd.optsWithGlobals<GlobalOptions>();
  await withRepository(opts, async (repo) => {
    const v = await fn(repo, repo.index.resolveVersion(ref));
    if (opts.json) printJson(versionJson(v));
    else process.stdout.write(`${v.id}: ${v.protected ? 'protected' : 'not protected'}, tags: ${v.tags.join(', ') || '(none)'}, expires: ${v.expire ? displayLocal(new Date(v.expire)) : 'never'}\n`);
  });
}
