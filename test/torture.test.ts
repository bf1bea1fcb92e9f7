/**
 * The CI-sized torture run (issue 15; docs/TORTURE.md): 50 seeded random schedules of backups, incremental
 * backups with hints, resumes, restores, rm, prune, cleanup (with and without grace), scrub, rekey, copy,
 * index rebuild, protect and tag, each step under an injected store fault or power loss (the store rolled
 * back to what was durable, the index sometimes lost or stale), then the invariant checker. Seeds are fixed
 * (TORTURE_SEED overrides), so a failure names the seed and the schedule to replay with bench/torture.sh.
 */
import test from 'ava';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { runSchedule, type ScheduleResult } from './torture/schedule.js';
import { CommandServer } from './torture/serverClient.js';

const SCHEDULES = 50;
const CHUNK = 5;
const SEED = Number(process.env.TORTURE_SEED ?? 15_000);
const WORKERS = 2;

// Two workers share the machine whatever ava's concurrency: each chunk waits for a free one.
const servers: CommandServer[] = [];
const free: number[] = [];
const waiting: ((i: number) => void)[] = [];
function acquire(): Promise<number> {
  const i = free.pop();
  return i !== undefined ? Promise.resolve(i) : new Promise((r) => waiting.push(r));
}
function release(i: number): void {
  const w = waiting.shift();
  if (w) w(i);
  else free.push(i);
}

const results: ScheduleResult[] = [];
let base = '';
const started = Date.now();

test.before(async () => {
  base = await fs.mkdtemp(path.join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'blocksafe-torture-'));
  for (let i = 0; i < WORKERS; i++) {
    servers.push(new CommandServer());
    free.push(i);
  }
});

test.after.always(async () => {
  for (const s of servers) s.close();
  if (base) await fs.rm(base, { recursive: true, force: true });
});

for (let c = 0; c < SCHEDULES / CHUNK; c++) {
  const seeds = Array.from({ length: CHUNK }, (_, k) => SEED + c * CHUNK + k);
  test(`torture schedules ${seeds[0]}..${seeds[CHUNK - 1]}: no invariant violated`, async (t) => {
    t.timeout(15 * 60_000);
    for (const seed of seeds) {
      const worker = await acquire();
      try {
        const dir = path.join(base, String(seed));
        await fs.mkdir(dir);
        const r = await runSchedule(seed, dir, { server: servers[worker], thorough: false });
        results.push(r);
        if (r.violations.length) t.log(`${r.violations.join('\n')}\nreplay: bash bench/torture.sh --schedules 1 --seed ${seed}\n${r.transcript}`);
        t.deepEqual(r.violations, [], `seed ${seed}`);
        await fs.rm(dir, { recursive: true, force: true });
      } finally {
        release(worker);
      }
    }
  });
}

test.after('the run injected at least 200 faults over 50 schedules', (t) => {
  const faults = results.reduce((a, r) => a + r.faults, 0);
  const commands = results.reduce((a, r) => a + r.commands, 0);
  const crashes = results.reduce((a, r) => a + r.crashes, 0);
  t.log(`torture: ${results.length} schedules, ${faults} faults injected (${crashes} power losses), ${commands} commands, ${((Date.now() - started) / 1000).toFixed(0)} s`);
  t.is(results.length, SCHEDULES);
  t.true(faults >= 200, `only ${faults} faults took effect`);
});
