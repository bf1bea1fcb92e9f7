/**
 * Retention (issue 5). The planner is a pure function, so a year of simulated daily versions with a fake
 * clock is pruned in memory and compared with a plan computed here independently from calendar arithmetic
 * (local time, Monday-based weeks, months); then `prune` through the real CLI with --dry-run, per-name
 * policies from the config, and protected versions.
 *
 * Local time matters, so this file runs in a zone with daylight saving time (and the year is also planned in
 * two other zones).
 */
process.env.TZ = 'Europe/Berlin';

import * as path from 'node:path';
import test from 'ava';
import { planPrune, type RetentionPolicy } from '../src/engine/prune.js';
import { emptyStats, type VersionRecord } from '../src/index/records.js';
import { assertCliError, initRepo, makeImage, MiB, repoState, runCli, type RepoFixture, type VersionJson } from './helpers.js';
import { ls, okJson, shmDir, writeConfig } from './lcHarness.js';

const ZONE = 'Europe/Berlin';
const NO_POLICY: RetentionPolicy = { last: 0, hourly: 0, daily: 0, weekly: 0, monthly: 0, yearly: 0 };

function rec(id: string, date: Date, extra: Partial<VersionRecord> = {}): VersionRecord {
  return {
    format: 1,
    id,
    name: 'vol',
    snapshot_name: '',
    date: date.toISOString(),
    size: MiB,
    block_size: MiB,
    complete: true,
    valid: true,
    protected: false,
    tags: [],
    expire: null,
    blocks_done: 1,
    source: '/dev/vg/vol',
    base: null,
    stats: emptyStats(),
    ...extra,
  };
}

/** Local calendar date of a version, YYYY-MM-DD (independent of the code under test). */
const ymd = (d: Date) => `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
const dayKey = ymd;
/** The Monday (local) starting the week of `d`: weeks are Monday..Sunday. */
const weekKey = (d: Date) => ymd(new Date(d.getFullYear(), d.getMonth(), d.getDate() - ((d.getDay() + 6) % 7)));
const monthKey = (d: Date) => ymd(d).slice(0, 7);

/** Newest version of each of the `n` most recent buckets. */
function newestPerBucket(vs: VersionRecord[], key: (d: Date) => string, n: number): string[] {
  const firstSeen = new Map<string, string>();
  for (const v of [...vs].sort((a, b) => Date.parse(b.date) - Date.parse(a.date))) {
    const k = key(new Date(v.date));
    if (!firstSeen.has(k)) firstSeen.set(k, v.id);
  }
  return [...firstSeen.values()].slice(0, n);
}

const kept = (vs: VersionRecord[], policy: RetentionPolicy, now: number) =>
  planPrune(vs, policy, now)
    .filter((d) => d.keep)
    .map((d) => d.version.id)
    .sort();

/** One version a day at 03:00 local time for 365 days, the newest on `end` (a local date). */
function year(end: [number, number, number]): VersionRecord[] {
  const out: VersionRecord[] = [];
  for (let back = 0; back < 365; back++) {
    const d = new Date(end[0], end[1] - 1, end[2] - back, 3, 0, 0);
    out.push(rec(`v${ymd(d)}`, d));
  }
  return out;
}

const POLICY: RetentionPolicy = { ...NO_POLICY, daily: 7, weekly: 4, monthly: 12 };

test('a year of daily versions pruned with keep-daily 7, keep-weekly 4, keep-monthly 12 keeps exactly the expected set (three time zones)', (t) => {
  // Friday 2026-11-27; the year starts 2025-11-28, so the 13th month (November 2025) is not kept
  const explicit = [
    // the 7 newest days
    '2026-11-21',
    '2026-11-22',
    '2026-11-23',
    '2026-11-24',
    '2026-11-25',
    '2026-11-26',
    '2026-11-27',
    // Sundays closing the 3 weeks before this one (this week's newest is 11-27, last week's 11-22 is daily)
    '2026-11-08',
    '2026-11-15',
    // last day of each of the 11 months before November 2026
    '2025-12-31',
    '2026-01-31',
    '2026-02-28',
    '2026-03-31',
    '2026-04-30',
    '2026-05-31',
    '2026-06-30',
    '2026-07-31',
    '2026-08-31',
    '2026-09-30',
    '2026-10-31',
  ].map((d) => `v${d}`);
  try {
    for (const zone of [ZONE, 'America/New_York', 'Asia/Kolkata']) {
      process.env.TZ = zone; // synchronous from here to the end of the loop body: no other test runs meanwhile
      const vs = year([2026, 11, 27]);
      const now = new Date(2026, 10, 27, 12, 0, 0).getTime();
      const expected = [...new Set([...newestPerBucket(vs, dayKey, 7), ...newestPerBucket(vs, weekKey, 4), ...newestPerBucket(vs, monthKey, 12)])].sort();
      t.deepEqual(expected, [...explicit].sort(), `${zone}: the independent calendar plan is the hand-made one`);
      const plan = planPrune(vs, POLICY, now);
      t.is(plan.length, 365);
      t.deepEqual(kept(vs, POLICY, now), expected, `${zone}: exactly the expected versions are kept`);
      for (const d of plan) t.is(d.keep, d.reasons.length > 0, `${zone}: ${d.version.id} has reasons iff it is kept`);
    }
  } finally {
    process.env.TZ = ZONE;
  }
});

test('the year across ISO-week and year boundaries: weeks are Monday..Sunday in local time', (t) => {
  // ends on Sunday 2026-01-04: 2025-12-29 .. 2026-01-04 is one ISO week (2026-W01) spanning two years
  const vs = year([2026, 1, 4]);
  const now = new Date(2026, 0, 4, 12).getTime();
  const weekly = kept(vs, { ...NO_POLICY, weekly: 3 }, now);
  t.deepEqual(weekly, ['v2025-12-21', 'v2025-12-28', 'v2026-01-04'], 'the newest version (a Sunday) of each of the 3 newest weeks');
  t.deepEqual(weekly, newestPerBucket(vs, weekKey, 3).sort());
  t.deepEqual(kept(vs, { ...NO_POLICY, monthly: 2 }, now), ['v2025-12-31', 'v2026-01-04']);
  t.deepEqual(kept(vs, { ...NO_POLICY, yearly: 2 }, now), ['v2025-12-31', 'v2026-01-04']);
  t.deepEqual(kept(vs, { ...NO_POLICY, yearly: 5 }, now), ['v2025-12-31', 'v2026-01-04'], 'only two years have versions');
});

test('protected versions survive whatever the policy; others outside the policy go', (t) => {
  const vs = year([2026, 11, 27]);
  const now = new Date(2026, 10, 27, 12).getTime();
  const protectedIds = ['v2026-06-15', 'v2026-11-20', 'v2025-11-28', 'v2026-11-27'];
  for (const v of vs) if (protectedIds.includes(v.id)) v.protected = true;
  const plain = year([2026, 11, 27]);
  const expected = [...new Set([...kept(plain, POLICY, now), ...protectedIds])].sort();
  t.is(expected.length, 20 + 3, 'precondition: three protected versions the policy alone would remove');
  const plan = planPrune(vs, POLICY, now);
  t.deepEqual(
    plan
      .filter((d) => d.keep)
      .map((d) => d.version.id)
      .sort(),
    expected,
  );
  for (const id of protectedIds) t.true(plan.find((d) => d.version.id === id)!.reasons.includes('protected'), `${id}: reason "protected"`);
  // the strictest policy keeps only protected versions and the newest
  t.deepEqual(kept(vs, { ...NO_POLICY, last: 1 }, now), [...protectedIds].sort());
});

test('expired versions are removed unless protected; a future expiry changes nothing', (t) => {
  const now = new Date(2026, 10, 27, 12).getTime();
  const vs = year([2026, 11, 27]);
  const byId = new Map(vs.map((v) => [v.id, v]));
  const past = new Date(now - 3600e3).toISOString();
  const future = new Date(now + 3600e3).toISOString();
  byId.get('v2026-11-27')!.expire = past; // newest of its day, week and month, yet expired
  byId.get('v2026-10-31')!.expire = past; // newest of its month
  byId.get('v2026-06-15')!.expire = past; // kept by nothing anyway
  byId.get('v2026-09-30')!.expire = past; // expired but protected
  byId.get('v2026-09-30')!.protected = true;
  byId.get('v2026-11-25')!.expire = future;
  const plan = new Map(planPrune(vs, POLICY, now).map((d) => [d.version.id, d]));
  t.false(plan.get('v2026-11-27')!.keep);
  t.deepEqual(plan.get('v2026-11-27')!.reasons, ['expired']);
  t.false(plan.get('v2026-10-31')!.keep);
  t.false(plan.get('v2026-06-15')!.keep);
  t.true(plan.get('v2026-09-30')!.keep, 'protected beats expired');
  t.true(plan.get('v2026-11-25')!.keep, 'not expired yet');
  t.true(plan.get('v2026-11-26')!.keep);
  // the expiry moment itself counts as expired
  byId.get('v2026-11-26')!.expire = new Date(now).toISOString();
  t.false(new Map(planPrune(vs, POLICY, now).map((d) => [d.version.id, d.keep])).get('v2026-11-26'));
});

test('an expired version does not use up a bucket: the day/month falls to its newest version that is not expired', (t) => {
  const now = new Date(2026, 10, 27, 20).getTime();
  // two versions a day for 3 days; the newest of the newest day is expired
  const vs: VersionRecord[] = [];
  for (const day of [25, 26, 27]) for (const hour of [3, 15]) vs.push(rec(`d${day}h${hour}`, new Date(2026, 10, day, hour)));
  vs.find((v) => v.id === 'd27h15')!.expire = new Date(now - 60e3).toISOString();
  // keep-daily 1 must still keep one version of the newest day, not remove every version of the volume
  t.deepEqual(kept(vs, { ...NO_POLICY, daily: 1 }, now), ['d27h3']);
  t.deepEqual(kept(vs, { ...NO_POLICY, daily: 3 }, now), ['d25h15', 'd26h15', 'd27h3']);
  t.deepEqual(kept(vs, { ...NO_POLICY, last: 2 }, now), ['d26h15', 'd27h3']);
});

test('calendar buckets are local days: versions at 00:30 and 23:30 local time, keep-daily 5 keeps the 23:30 ones', (t) => {
  const vs: VersionRecord[] = [];
  for (let day = 10; day <= 20; day++) {
    vs.push(rec(`early-${day}`, new Date(2026, 0, day, 0, 30)));
    vs.push(rec(`late-${day}`, new Date(2026, 0, day, 23, 30)));
  }
  const now = new Date(2026, 0, 21, 1).getTime();
  // in UTC (Berlin is UTC+1 in January) 00:30 local belongs to the previous day and would be its newest
  t.deepEqual(kept(vs, { ...NO_POLICY, daily: 5 }, now), ['late-16', 'late-17', 'late-18', 'late-19', 'late-20']);
  // hourly: the newest of each of the 3 newest local hours with a version
  t.deepEqual(kept(vs, { ...NO_POLICY, hourly: 3 }, now), ['early-20', 'late-19', 'late-20']);
});

test('keep-last counts complete versions; an incomplete version is kept only while it is newer than every complete one', (t) => {
  const now = new Date(2026, 10, 27, 20).getTime();
  const vs = [1, 2, 3, 4, 5, 6].map((h) => rec(`h${h}`, new Date(2026, 10, 27, h)));
  vs.push(rec('stale-incomplete', new Date(2026, 10, 27, 3, 30), { complete: false }));
  vs.push(rec('resumable', new Date(2026, 10, 27, 7), { complete: false }));
  const plan = new Map(planPrune(vs, { ...NO_POLICY, last: 2 }, now).map((d) => [d.version.id, d]));
  t.deepEqual(
    [...plan.values()]
      .filter((d) => d.keep)
      .map((d) => d.version.id)
      .sort(),
    ['h5', 'h6', 'resumable'],
  );
  t.deepEqual(plan.get('h6')!.reasons, ['last 1'], 'the incomplete version does not take a keep-last slot');
  t.false(plan.get('stale-incomplete')!.keep);
});

// ------------------------------------------------------------------------------------------------ CLI

async function cliRepo(t: Parameters<typeof shmDir>[0]) {
  const dir = await shmDir(t);
  const repo = await initRepo(path.join(dir, 'repo'), { blockSize: '1M', encryption: 'none' });
  const img = await makeImage(path.join(dir, 'x.img'), { blockSize: MiB, blocks: ['random', 'text'], seed: 'prune-cli' });
  const backup = (name: string) => okJson<VersionJson>(repo, ['backup', img.path, name]);
  const a1 = await backup('a');
  const a2 = await backup('a');
  const a3 = await backup('a');
  const a4 = await backup('a');
  const b1 = await backup('b');
  const b2 = await backup('b');
  return { dir, repo, a1, a2, a3, a4, b1, b2 };
}

interface PruneJson {
  dry_run: boolean;
  names: { name: string; policy: RetentionPolicy; versions: { id: string; date: string; keep: boolean; reasons: string[] }[] }[];
  removed: string[];
}

const idsOf = async (repo: RepoFixture) => (await ls(repo)).map((v) => v.id).sort();

test('prune CLI: --dry-run prints the plan and removes nothing; the real run removes exactly the planned versions, never a protected one', async (t) => {
  const { repo, a1, a2, a3, a4, b1, b2 } = await cliRepo(t);
  await okJson(repo, ['protect', a1.id]);
  const before = await repoState(repo);

  const dry = await okJson<PruneJson>(repo, ['prune', '--keep-last', '2', '--dry-run']);
  t.true(dry.dry_run);
  t.deepEqual(dry.removed, []);
  t.deepEqual(dry.names.map((n) => n.name).sort(), ['a', 'b']);
  const planA = new Map(dry.names.find((n) => n.name === 'a')!.versions.map((v) => [v.id, v]));
  t.deepEqual(dry.names.find((n) => n.name === 'a')!.policy, { ...NO_POLICY, last: 2 });
  t.deepEqual(
    [...planA.values()].filter((v) => !v.keep).map((v) => v.id),
    [a2.id],
  );
  t.true(planA.get(a1.id)!.keep);
  t.true(planA.get(a1.id)!.reasons.includes('protected'));
  t.true(dry.names.find((n) => n.name === 'b')!.versions.every((v) => v.keep));
  t.deepEqual(await repoState(repo), before, '--dry-run changes nothing');

  const real = await okJson<PruneJson>(repo, ['prune', '--keep-last', '2']);
  t.false(real.dry_run);
  t.deepEqual(real.removed, [a2.id]);
  t.deepEqual(await idsOf(repo), [a1.id, a3.id, a4.id, b1.id, b2.id].sort());

  // a second run with the same policy has nothing left to do
  const again = await okJson<PruneJson>(repo, ['prune', '--keep-last', '2']);
  t.deepEqual(again.removed, []);
});

test('prune CLI: per-name retention from the config, --name, and no policy at all is a usage error', async (t) => {
  const { dir, repo, a1, a2, a3, a4, b1, b2 } = await cliRepo(t);
  const before = await repoState(repo);
  const r = await runCli(['prune', ...repo.args], { env: repo.env });
  assertCliError(t, r, 2, /retention|policy/i);
  t.deepEqual(await repoState(repo), before, 'no policy: nothing removed');

  const conf = await writeConfig(dir, 'retention.conf', '[retention]\nkeep_last = 1\n\n[retention.a]\nkeep_last = 3');
  const onlyB = await okJson<PruneJson>(repo, ['prune', '--name', 'b'], ['--config', conf]);
  t.deepEqual(
    onlyB.names.map((n) => n.name),
    ['b'],
  );
  t.deepEqual(onlyB.names[0]!.policy, { ...NO_POLICY, last: 1 }, '[retention] applies to b');
  t.deepEqual(onlyB.removed, [b1.id]);
  t.deepEqual(await idsOf(repo), [a1.id, a2.id, a3.id, a4.id, b2.id].sort());

  const all = await okJson<PruneJson>(repo, ['prune'], ['--config', conf]);
  t.deepEqual(all.names.find((n) => n.name === 'a')!.policy, { ...NO_POLICY, last: 3 }, '[retention.a] applies to a');
  t.deepEqual(all.removed, [a1.id]);
  t.deepEqual(await idsOf(repo), [a2.id, a3.id, a4.id, b2.id].sort());

  // flags replace the configured policy
  const flags = await okJson<PruneJson>(repo, ['prune', '--keep-last', '1', '--name', 'a'], ['--config', conf]);
  t.deepEqual(flags.removed.sort(), [a2.id, a3.id].sort());
  t.deepEqual(await idsOf(repo), [a4.id, b2.id].sort());
});
