/**
 * One seeded random schedule: a short run of repository operations, most with one injected fault (an I/O
 * error, timeout, ENOSPC, damaged read, or a power loss that kills the command and rolls the store back to
 * what was durable, sometimes losing or staling the index too), power cuts between commands, and on-disk
 * damage; then the invariant checker. Everything random comes from the seed, so a failure replays.
 */
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import type { Fault, FaultKind, FaultOp } from '../../src/store/faulty.js';
import type { CliResult } from '../helpers.js';
import { checkInvariants, checkPresence, verifyRestore } from './invariants.js';
import type { CommandServer } from './serverClient.js';
import { World, type LsVersion, type Source } from './world.js';

export interface ScheduleResult {
  seed: number;
  steps: number;
  commands: number;
  faults: number;
  /** Faults by "op:kind". */
  mix: Record<string, number>;
  crashes: number;
  violations: string[];
  /** The schedule as run, one step a line (printed with a failure, to replay with the seed). */
  transcript: string;
}

type Op = 'backup' | 'incremental' | 'resume' | 'restore' | 'rm' | 'prune' | 'cleanup' | 'cleanup-grace' | 'scrub' | 'rekey' | 'copy' | 'rebuild' | 'protect' | 'tag';

const OPS: [Op, number][] = [
  ['backup', 3],
  ['incremental', 3],
  ['resume', 1],
  ['restore', 2],
  ['rm', 2],
  ['prune', 1],
  ['cleanup', 2],
  ['cleanup-grace', 1],
  ['scrub', 1],
  ['rekey', 1],
  ['copy', 1],
  ['rebuild', 1],
  ['protect', 1],
  ['tag', 1],
];

/** Which store operations each command does enough of to fail, and how far in. */
const FAULT_SITES: Record<Op, [FaultOp, number][]> = {
  backup: [
    ['put', 30],
    ['sync', 2],
    ['list', 1],
  ],
  incremental: [
    ['put', 6],
    ['get', 3],
    ['sync', 2],
  ],
  resume: [
    ['put', 10],
    ['get', 2],
    ['sync', 2],
  ],
  restore: [['get', 12]],
  rm: [
    ['delete', 1],
    ['put', 1],
    ['sync', 1],
  ],
  prune: [
    ['delete', 1],
    ['sync', 1],
  ],
  cleanup: [
    ['delete', 4],
    ['list', 2],
    ['put', 1],
    ['sync', 1],
  ],
  'cleanup-grace': [
    ['list', 2],
    ['put', 1],
    ['sync', 1],
  ],
  scrub: [['get', 12]],
  rekey: [
    ['put', 20],
    ['get', 10],
    ['delete', 2],
    ['sync', 2],
  ],
  copy: [
    ['put', 20],
    ['sync', 2],
  ],
  rebuild: [
    ['get', 3],
    ['list', 2],
  ],
  protect: [
    ['put', 1],
    ['sync', 1],
  ],
  tag: [
    ['put', 1],
    ['sync', 1],
  ],
};

export interface ScheduleOptions {
  steps?: number;
  /** Another blocksafe's bin/blocksafe.js (the old code). */
  bin?: string;
  thorough?: boolean;
  server?: CommandServer;
}

export async function runSchedule(seed: number, dir: string, opts: ScheduleOptions = {}): Promise<ScheduleResult> {
  const w = new World(seed, dir, opts.bin, opts.thorough ?? true, opts.server);
  await w.setup();
  const nSteps = opts.steps ?? w.rng.int(4, 6);
  for (let i = 0; i < nSteps; i++) {
    const op = w.mustExist.size === 0 && i < 2 ? 'backup' : w.rng.weighted(OPS);
    await step(w, op);
  }
  if (w.rng.chance(0.4)) await damage(w);
  await checkInvariants(w);
  return {
    seed,
    steps: w.steps.length,
    commands: w.commands,
    faults: w.faults(),
    mix: w.faultMix(),
    crashes: w.crashes,
    violations: w.violations,
    transcript: w.steps
      .map((s) => `  ${s.n}. ${s.what}${[s.fault, s.extra].map((f) => (f ? ` [fault ${f.op}#${f.nth} ${f.kind}${f.prefix ? ` ${f.prefix}` : ''}]` : '')).join('')}${s.result ? ` → ${s.result}` : ''}`)
      .join('\n'),
  };
}

function chooseFault(w: World, op: Op): Fault | undefined {
  if (!w.rng.chance(0.95)) return undefined;
  const [site, maxNth] = w.rng.pick(FAULT_SITES[op]);
  const reads = site === 'get';
  const kind: FaultKind = w.rng.weighted<FaultKind>(
    reads
      ? [
          ['eio', 2],
          ['timeout', 1],
          ['short', 1],
          ['bitflip', 2],
          ['truncate', 1],
          ['powerloss', 2],
        ]
      : [
          ['eio', 2],
          ['timeout', 1],
          ['enospc', 2],
          ['powerloss', 4],
        ],
  );
  const fault: Fault = { op: site, nth: w.rng.int(1, maxNth), kind };
  if (site === 'put' && w.rng.chance(0.5) && (op === 'backup' || op === 'copy')) fault.prefix = 'data/';
  return fault;
}

async function step(w: World, op: Op): Promise<void> {
  const versions = await currentVersions(w);
  const complete = versions.filter((v) => v.complete && w.sources.has(v.snapshot_name));
  const fault = chooseFault(w, op);
  // commands that read many blocks also meet a damaged read now and then (transient: the object is fine)
  let extra: Fault | undefined;
  if (READERS.has(op) && w.rng.chance(0.8) && !(fault?.op === 'get')) extra = { op: 'get', nth: w.rng.int(1, 8), kind: w.rng.pick(['bitflip', 'short', 'truncate'] as const) };
  const rec: StepRecordLike = { n: w.steps.length + 1, what: op as string, fault, extra };
  const faults = () => [rec.fault, rec.extra].filter((f): f is Fault => f !== undefined);
  w.steps.push(rec);
  const indexCopy = path.join(w.dir, 'index-before');
  const crashy = fault?.kind === 'powerloss';
  if (crashy) {
    await fs.rm(indexCopy, { recursive: true, force: true });
    await fs.cp(path.join(w.repo, 'index'), indexCopy, { recursive: true }).catch(() => undefined);
  }
  let r: CliResult | undefined;
  switch (op) {
    case 'backup':
    case 'incremental': {
      const name = w.rng.pick(['a', 'b']);
      const bases = complete.filter((v) => v.name === name);
      if (op === 'incremental' && bases.length) {
        const base = w.rng.pick(bases);
        const { src, hints } = await w.newSource(w.sources.get(base.snapshot_name));
        rec.what = `incremental ${name} from ${base.id} (${src.id})`;
        r = await w.cli(['backup', src.file, name, '-s', src.id, '--from', base.id, '--hints', hints!, '--json'], faults());
      } else {
        const { src } = await w.newSource();
        rec.what = `backup ${name} (${src.id}, ${src.size} bytes)`;
        r = await w.cli(['backup', src.file, name, '-s', src.id, '--json'], faults());
      }
      if (r.code === 0) {
        const v = JSON.parse(r.stdout) as LsVersion;
        w.mustExist.set(v.id, `backup at step ${rec.n}`);
        w.known?.unshift(v);
      }
      break;
    }
    case 'resume': {
      const inc = versions.find((v) => !v.complete && w.sources.has(v.snapshot_name));
      if (!inc) {
        rec.what = 'resume (nothing to resume)';
        rec.fault = rec.extra = undefined;
        return;
      }
      const src = w.sources.get(inc.snapshot_name)!;
      rec.what = `resume ${inc.name} ${inc.id}`;
      r = await w.cli(['backup', src.file, inc.name, '--resume', '-s', src.id, '--json'], faults());
      if (r.code === 0) {
        const v = JSON.parse(r.stdout) as LsVersion;
        w.mustExist.set(v.id, `resume at step ${rec.n}`);
        w.known = w.known?.map((x) => (x.id === v.id ? v : x));
      }
      break;
    }
    case 'restore': {
      if (!complete.length) return skip(rec);
      const v = w.rng.pick(complete);
      rec.what = `restore ${v.id}`;
      const target = path.join(w.dir, 'target.img');
      r = await w.cli(['restore', v.id, target, '--json', '--force'], faults());
      if (r.code === 0 && existsSync(target)) {
        const src = w.sources.get(v.snapshot_name)!;
        const { sha256Of } = await import('./world.js');
        if ((await sha256Of(target)) !== src.hash) w.violation(`restore of ${v.id} exited 0 but the bytes differ from ${src.id}${fault ? ` (with ${fault.kind} on ${fault.op}#${fault.nth})` : ''}`);
      }
      await fs.rm(target, { force: true });
      break;
    }
    case 'rm': {
      const cand = versions.filter((v) => !v.protected);
      if (!cand.length) return skip(rec);
      const v = w.rng.pick(cand);
      rec.what = `rm ${v.id}`;
      r = await w.cli(['rm', v.id, '--json'], faults());
      w.mustExist.delete(v.id);
      if (r.code === 0) {
        w.removed.add(v.id);
        w.known = w.known?.filter((x) => x.id !== v.id);
      }
      break;
    }
    case 'prune': {
      const name = w.rng.pick(['a', 'b']);
      rec.what = `prune --keep-last 1 --name ${name}`;
      for (const v of versions) if (v.name === name && !v.protected) w.mustExist.delete(v.id); // any of them may go
      r = await w.cli(['prune', '--keep-last', '1', '--name', name, '--json'], faults());
      if (r.code === 0) {
        const gone = (JSON.parse(r.stdout) as { removed: string[] }).removed;
        for (const id of gone) w.removed.add(id);
        w.known = w.known?.filter((x) => !gone.includes(x.id));
      }
      break;
    }
    case 'cleanup':
    case 'cleanup-grace': {
      const args = op === 'cleanup' ? ['cleanup', '--grace', '0', '--json'] : ['cleanup', '--json'];
      rec.what = args.join(' ');
      r = await w.cli(args, faults());
      break;
    }
    case 'scrub':
      r = await w.cli(['scrub', '--all', '--json'], faults());
      break;
    case 'rekey':
      r = await w.cli(['rekey', '--json'], faults());
      break;
    case 'copy': {
      if (!complete.length) return skip(rec);
      if (!w.repo2Ready) {
        const init = await w.cli(['init', '--block-size', '64K'], undefined, w.repo2);
        if (init.code !== 0) w.violation(`init of the second repository failed: ${init.stderr.trim()}`);
        w.repo2Ready = true;
      }
      const v = w.rng.pick(complete);
      rec.what = `copy ${v.id}`;
      // half the faults hit the destination, half the source
      const toDest = w.rng.chance(0.5);
      r = toDest ? await copyWithFaultOnDest(w, v.id, fault) : await w.cli(['copy', v.id, '--to', w.repo2, '--to-key-file', w.key, '--json'], faults());
      if (r.code === 0) w.copied.add(v.id);
      break;
    }
    case 'rebuild': {
      rec.what = 'index rebuild';
      r = await w.cli(['index', 'rebuild', '--json'], faults());
      if (r.code === 0) {
        const prev = (JSON.parse(r.stdout) as { previous_index?: string | null }).previous_index;
        if (prev) await fs.rm(prev, { recursive: true, force: true });
      }
      break;
    }
    case 'protect':
    case 'tag': {
      if (!versions.length) return skip(rec);
      const v = w.rng.pick(versions);
      rec.what = op === 'protect' ? `protect ${v.id}` : `tag add ${v.id} t${rec.n}`;
      r = await w.cli(op === 'protect' ? ['protect', v.id] : ['tag', 'add', v.id, `t${rec.n}`], fault);
      if (r.code === 0 && op === 'protect') v.protected = true;
      break;
    }
  }
  if (!r) return;
  rec.result = outcome(r);
  if (r.code !== 0) w.known = undefined; // a failed or killed command may have left anything: ask again
  judge(w, op, r, rec.fault ?? rec.extra);
  if (r.signal === 'SIGKILL') {
    w.crashes++;
    // a plain kill -9 keeps the page cache (what was not yet durable stays pending for a later power cut);
    // a power loss loses it
    rec.result += w.rng.chance(0.25) ? '; kill -9 only' : `; ${w.powerCut()}`;
    // The LMDB index is outside the model: sometimes it is lost, sometimes an older copy comes back.
    const fate = w.rng.weighted([
      ['kept', 2],
      ['lost', 1],
      ['stale', 1],
    ] as const);
    if (fate !== 'kept') {
      await fs.rm(path.join(w.repo, 'index'), { recursive: true, force: true });
      if (fate === 'stale' && existsSync(indexCopy)) await fs.cp(indexCopy, path.join(w.repo, 'index'), { recursive: true });
      rec.result += `; index ${fate}`;
    }
  } else if (w.rng.chance(0.15)) {
    // power fails after the command finished: whatever it reported done must already be durable
    rec.result += `; between commands ${w.powerCut()}`;
  }
  if (r.signal === 'SIGKILL' || rec.result.includes('between')) {
    w.known = await w.ls();
    if (w.known) checkPresence(w, w.known, `after the power cut of step ${rec.n}`);
  }
}

interface StepRecordLike {
  n: number;
  what: string;
  fault?: Fault;
  extra?: Fault;
  result?: string;
}

const READERS = new Set<Op>(['restore', 'scrub', 'rekey', 'incremental', 'copy']);

function skip(rec: StepRecordLike): void {
  rec.what += ' (nothing to do)';
  rec.fault = rec.extra = undefined;
}

/** copy with the fault in the destination store. */
async function copyWithFaultOnDest(w: World, id: string, fault: Fault | undefined): Promise<CliResult> {
  const { FAULT_ENV, FAULT_GUARD, FAULT_GUARD_ENV } = await import('../../src/store/faulty.js');
  const spec = { faults: fault ? [fault] : [], root: w.repo2, journal: `${w.journal}-2`, log: w.faultLog };
  return w.cli(['copy', id, '--to', w.repo2, '--to-key-file', w.key, '--json'], undefined, w.repo, { [FAULT_ENV]: JSON.stringify(spec), [FAULT_GUARD_ENV]: FAULT_GUARD });
}

function outcome(r: CliResult): string {
  if (r.signal) return `killed (${r.signal})`;
  if (r.code === 0) return 'ok';
  return `exit ${r.code}: ${r.stderr.trim().split('\n').pop()}`;
}

/** The error contract under faults: one clear line, a documented exit code; and no fault, no failure. */
function judge(w: World, op: Op, r: CliResult, fault: Fault | undefined): void {
  if (r.signal) {
    if (r.signal !== 'SIGKILL' || fault?.kind !== 'powerloss') w.violation(`${op} died by ${r.signal}`);
    return;
  }
  if (r.code === 0) return;
  const lines = r.stderr
    .trim()
    .split('\n')
    .filter((l) => l && !l.startsWith('blocksafe: note:') && !l.startsWith('blocksafe: warning:'));
  // exit 3 from restore/scrub/check: the damage is in the --json report on stdout, stderr may be empty
  if (r.code === 3 && lines.length === 0 && r.stdout.includes('"damaged"')) return;
  if (r.stderr.includes('\n    at ') || lines.length !== 1 || !lines[0]!.startsWith('blocksafe: ')) w.violation(`${op} failed without one clear error line: ${JSON.stringify(r.stderr.slice(0, 300))}`);
  if (![1, 3, 4].includes(r.code ?? -1)) w.violation(`${op} exit code ${r.code}`);
  if (!fault && !(r.code === 3 && (op === 'restore' || op === 'scrub'))) w.violation(`${op} failed with no fault injected (exit ${r.code}): ${lines[0]}`);
}

/** The versions as the repository lists them now (the harness's view for choosing arguments). */
async function currentVersions(w: World): Promise<LsVersion[]> {
  if (!w.known) w.known = (await w.ls()) ?? [];
  return w.known;
}

/**
 * Flips one bit of a block a complete version uses (persistent damage scrub must find). Only such blocks:
 * an unreferenced leftover (a crashed backup's, young enough for cleanup to keep) is no version's concern.
 */
async function damage(w: World): Promise<void> {
  w.steps.push({ n: w.steps.length + 1, what: 'damage (no complete version)' });
  const versions = (await w.ls())?.filter((v) => v.complete) ?? [];
  if (!versions.length) return;
  const v = w.rng.pick(versions);
  const exp = await w.cli(['export', v.id, '-']);
  if (exp.code !== 0) return w.violation(`export ${v.id} failed (exit ${exp.code}): ${exp.stderr.trim()}`);
  const blocks = (JSON.parse(exp.stdout) as { blocks: (string | null)[] }).blocks.filter((b): b is string => b !== null);
  if (!blocks.length) return;
  const checksum = w.rng.pick([...new Set(blocks)].sort());
  const file = path.join(w.repo, 'data', checksum.slice(0, 2), checksum);
  const buf = await fs.readFile(file);
  if (buf.length === 0) return;
  const bit = w.rng.int(0, buf.length * 8 - 1);
  buf[bit >> 3]! ^= 1 << (bit & 7);
  await fs.writeFile(file, buf);
  w.damaged.add(checksum);
  w.harnessFaults++;
  w.steps[w.steps.length - 1]!.what = `damage: flipped bit ${bit} of ${checksum.slice(0, 8)} (used by ${v.id})`;
}

export type { Source };
export { verifyRestore };
