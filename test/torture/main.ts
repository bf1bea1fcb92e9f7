/**
 * Runs N seeded torture schedules (bench/torture.sh): `--schedules N --seed S [--parallel P] [--bin B]`.
 * Prints each violation with its seed and schedule, then exactly one summary line:
 * `torture: N schedules, F faults injected, V violations`; exits 1 when V > 0.
 */
import * as fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { runSchedule, type ScheduleResult } from './schedule.js';
import { CommandServer } from './serverClient.js';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : def;
}

const schedules = Number(arg('--schedules', '20'));
const seed = Number(arg('--seed', String(Date.now() % 1_000_000)));
const parallel = Number(arg('--parallel', '2'));
const bin = process.argv.includes('--bin') ? arg('--bin', '') : undefined;
const base = await fs.mkdtemp(path.join(process.env.TORTURE_DIR ?? ((await fs.stat('/dev/shm').catch(() => undefined)) ? '/dev/shm' : tmpdir()), 'blocksafe-torture-'));
const started = Date.now();
const results: ScheduleResult[] = [];
let next = 0;
async function worker(): Promise<void> {
  const server = process.argv.includes('--no-server') ? undefined : new CommandServer(bin ? path.join(path.dirname(bin), '..', 'dist', 'src', 'cli', 'main.js') : undefined);
  try {
    await work(server);
  } finally {
    server?.close();
  }
}
async function work(server: CommandServer | undefined): Promise<void> {
  while (next < schedules) {
    const s = seed + next++;
    const dir = path.join(base, String(s));
    await fs.mkdir(dir);
    let r: ScheduleResult;
    try {
      r = await runSchedule(s, dir, { bin, server, thorough: !process.argv.includes('--quick') });
    } catch (err) {
      r = { seed: s, steps: 0, commands: 0, faults: 0, mix: {}, crashes: 0, violations: [`seed ${s}: harness error: ${(err as Error).stack}`], transcript: '' };
    }
    results.push(r);
    if (r.violations.length || process.env.TORTURE_VERBOSE) {
      process.stdout.write(`${r.violations.join('\n')}\n  replay: bash bench/torture.sh --schedules 1 --seed ${s}${bin ? ` --bin ${bin}` : ''}\n${r.transcript}\n`);
    } else await fs.rm(dir, { recursive: true, force: true });
  }
}
await Promise.all(Array.from({ length: parallel }, worker));
const sum = (f: (r: ScheduleResult) => number) => results.reduce((a, r) => a + f(r), 0);
const violations = sum((r) => r.violations.length);
const secs = ((Date.now() - started) / 1000).toFixed(1);
const mix: Record<string, number> = {};
for (const r of results) for (const [k, n] of Object.entries(r.mix)) mix[k] = (mix[k] ?? 0) + n;
const byKind: Record<string, number> = {};
for (const [k, n] of Object.entries(mix)) byKind[k.split(':')[1]!] = (byKind[k.split(':')[1]!] ?? 0) + n;
process.stdout.write(
  `fault mix: ${Object.entries(byKind)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} ${n}`)
    .join(', ')}; by site: ${Object.entries(mix)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} ${n}`)
    .join(', ')}\n`,
);
const { KNOWN } = await import('./known.js');
process.stdout.write(`known bugs not fixed: ${KNOWN.map((k) => k.id).join(', ') || 'none'} (test/torture/known.ts)\n`);
process.stdout.write(
  `details: seeds ${seed}..${seed + schedules - 1}, ${sum((r) => r.steps)} steps, ${sum((r) => r.commands)} commands, ${sum((r) => r.crashes)} power losses, ${results.filter((r) => r.violations.length).length} failing schedules, ${secs} s\n`,
);
if (process.env.TORTURE_PROFILE) {
  const { World } = await import('./world.js');
  for (const [k, [n, ms]] of World.profile) process.stdout.write(`profile: ${k}: ${n} runs, ${(ms / n).toFixed(0)} ms each\n`);
}
if (violations === 0) await fs.rm(base, { recursive: true, force: true });
else process.stdout.write(`kept the failing schedules' directories under ${base}\n`);
process.stdout.write(`torture: ${schedules} schedules, ${sum((r) => r.faults)} faults injected, ${violations} violations\n`);
process.exit(violations > 0 ? 1 : 0);
