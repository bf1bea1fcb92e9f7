/**
 * The state of one torture schedule: its directories, source images (kept unchanged, known by hash), what
 * the harness knows about each version, and how to run the CLI with an injected fault.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { FAULT_ENV, FAULT_GUARD, FAULT_GUARD_ENV, recoverPowerLoss, type Fault, type FaultSpec } from '../../src/store/faulty.js';
import { runCli, type CliResult } from '../helpers.js';
import { Prng } from './prng.js';
import type { CommandServer } from './serverClient.js';

export const BLOCK = 64 * 1024;

export interface Source {
  /** Also the snapshot name of every version made from it (how the harness maps a version to its bytes). */
  id: string;
  file: string;
  hash: string;
  size: number;
}

/** A version as `ls --json` prints it (the fields the harness reads). */
export interface LsVersion {
  id: string;
  name: string;
  snapshot_name: string;
  complete: boolean;
  valid: boolean;
  protected: boolean;
  tags: string[];
  expire: string | null;
}

export interface StepRecord {
  n: number;
  what: string;
  fault?: Fault;
  extra?: Fault;
  result?: string;
}

export class World {
  readonly rng: Prng;
  readonly repo: string;
  readonly repo2: string;
  readonly key: string;
  readonly journal: string;
  readonly faultLog: string;
  readonly config: string;
  repo2Ready = false;
  /** False: every command in a process of its own (TORTURE_SPAWN_ALL=1), as a check on the in-process server. */
  inProcess = process.env.TORTURE_SPAWN_ALL !== '1';
  /** The version list as last seen (kept up to date from command output; undefined: ask `ls`). */
  known: LsVersion[] | undefined;
  readonly sources = new Map<string, Source>();
  /** Versions a command reported as done (exit 0) and nothing removed since: they must survive anything. */
  readonly mustExist = new Map<string, string>();
  /** Versions `rm`/`prune` reported removed (exit 0): they must never come back. */
  readonly removed = new Set<string>();
  /** Checksums of blocks the harness damaged on disk: scrub must report exactly these. */
  readonly damaged = new Set<string>();
  /** Versions copied to repo2 with exit 0. */
  readonly copied = new Set<string>();
  readonly steps: StepRecord[] = [];
  readonly violations: string[] = [];
  /** Faults that took effect (from the wrapper's log) plus damage the harness did itself. */
  harnessFaults = 0;
  commands = 0;
  crashes = 0;
  private srcCount = 0;

  constructor(
    readonly seed: number,
    readonly dir: string,
    readonly bin?: string,
    /** More restores and an index rebuild in every schedule (the long run); the CI run samples. */
    readonly thorough = true,
    /** Runs fault-free commands in one long-lived process (see server.ts). */
    readonly server?: CommandServer,
  ) {
    this.rng = new Prng(seed);
    this.repo = path.join(dir, 'repo');
    this.repo2 = path.join(dir, 'repo2');
    this.key = path.join(dir, 'key');
    this.journal = path.join(dir, 'journal');
    this.faultLog = path.join(dir, 'faults.log');
    this.config = path.join(dir, 'blocksafe.conf');
  }

  /** A new repository (its own id: trust records of different schedules must never meet). */
  async setup(): Promise<void> {
    // One worker thread: the order of store operations, and so "the Nth put", repeats from run to run.
    // Trust records (src/engine/trust.ts) away from the machine's, shared by the run (the in-process server
    // reads its configuration once): each schedule's repository has its own id, so they never meet.
    await fs.writeFile(this.config, `[pipeline]\nthreads = 1\nqueue_depth = 2\n[s3]\nstate_dir = ${path.join(path.dirname(this.dir), 'state')}\n`);
    await fs.writeFile(this.key, this.rng.bytes(64), { mode: 0o600 });
    const r = await this.cli(['init', '--block-size', '64K']);
    if (r.code !== 0) throw new Error(`init failed: ${r.stderr}`);
  }

  args(repo = this.repo): string[] {
    return ['--repo', repo, '--key-file', this.key, '--config', this.config];
  }

  /** Runs the CLI on the main repository (or `repo`); `fault` is injected into that store only. */
  async cli(argv: string[], fault?: Fault | Fault[], repo = this.repo, extraEnv: Record<string, string> = {}): Promise<CliResult> {
    const faults = fault === undefined ? [] : Array.isArray(fault) ? fault : [fault];
    const spec: FaultSpec = { faults, root: repo, journal: this.journal, log: this.faultLog };
    const env: Record<string, string> = { [FAULT_ENV]: JSON.stringify(spec), [FAULT_GUARD_ENV]: FAULT_GUARD, ...extraEnv };
    this.commands++;
    const [cmd, ...rest] = argv;
    const sub = cmd === 'index' || cmd === 'tag' ? [cmd, rest.shift()!] : [cmd!];
    const t0 = Date.now();
    const full = [...sub, ...this.args(repo), ...rest];
    // A power loss must kill a process of its own; everything else can run in the long-lived one
    const ownProcess = faults.some((f) => f.kind === 'powerloss') || (extraEnv[FAULT_ENV] ?? '').includes('powerloss') || this.inProcess === false;
    const r = this.server && !ownProcess ? await this.server.run(full, env) : this.bin ? await runWith(this.bin, full, env) : await runCli(full, { env });
    const k = sub.join(' ');
    const p = World.profile.get(k) ?? [0, 0];
    World.profile.set(k, [p[0] + 1, p[1] + Date.now() - t0]);
    return r;
  }

  /** Commands run and milliseconds spent, per subcommand (TORTURE_PROFILE=1 prints it). */
  static readonly profile = new Map<string, [number, number]>();

  /** Faults the wrapper logged so far (each line is one that took effect). */
  loggedFaults(): number {
    if (!existsSync(this.faultLog)) return 0;
    return readFileSync(this.faultLog, 'utf8').split('\n').filter(Boolean).length;
  }

  /** Faults that took effect, by kind (the wrapper's log, plus the harness's on-disk damage). */
  faultMix(): Record<string, number> {
    const mix: Record<string, number> = {};
    if (existsSync(this.faultLog)) {
      for (const line of readFileSync(this.faultLog, 'utf8').split('\n').filter(Boolean)) {
        const f = JSON.parse(line) as Fault;
        const k = `${f.op}:${f.kind}`;
        mix[k] = (mix[k] ?? 0) + 1;
      }
    }
    if (this.harnessFaults) mix['disk:bitflip'] = this.harnessFaults;
    return mix;
  }

  faults(): number {
    return this.loggedFaults() + this.harnessFaults;
  }

  violation(what: string): void {
    const step = this.steps.length ? this.steps[this.steps.length - 1]!.n : 0;
    this.violations.push(`seed ${this.seed} step ${step}: ${what}`);
  }

  /** A new source image: fresh random data, or a copy of `base` with a few blocks changed (plus their hints). */
  async newSource(base?: Source): Promise<{ src: Source; hints?: string }> {
    const id = `s${++this.srcCount}`;
    const file = path.join(this.dir, `${id}.img`);
    let data: Buffer;
    let hints: string | undefined;
    if (!base) {
      const blocks = this.rng.int(8, 40);
      const tail = this.rng.chance(0.3) ? this.rng.int(1, BLOCK / 4 - 1) * 4 : 0;
      data = Buffer.concat([this.rng.bytes(blocks * BLOCK), this.rng.bytes(tail)]);
      // some sparse and some duplicate blocks, so dedup and holes are exercised
      for (let i = 0; i < blocks; i++) {
        if (this.rng.chance(0.15)) data.fill(0, i * BLOCK, (i + 1) * BLOCK);
        else if (this.rng.chance(0.1) && i > 0) data.copy(data, i * BLOCK, 0, BLOCK);
      }
    } else {
      data = Buffer.from(await fs.readFile(base.file));
      const blocks = Math.ceil(data.length / BLOCK);
      const changed = new Set<number>();
      for (let k = this.rng.int(1, 4); k > 0; k--) changed.add(this.rng.int(0, blocks - 1));
      const extents = [];
      for (const b of changed) {
        const start = b * BLOCK;
        const len = Math.min(BLOCK, data.length - start);
        if (this.rng.chance(0.2)) data.fill(0, start, start + len);
        else this.rng.bytes(BLOCK).copy(data, start, 0, len);
        extents.push({ offset: start, length: len, exists: 'true' });
      }
      hints = path.join(this.dir, `${id}.hints.json`);
      await fs.writeFile(hints, JSON.stringify(extents));
    }
    await fs.writeFile(file, data);
    const src: Source = { id, file, hash: createHash('sha256').update(data).digest('hex'), size: data.length };
    this.sources.set(id, src);
    return { src, hints };
  }

  async ls(repo = this.repo): Promise<LsVersion[] | undefined> {
    const r = await this.cli(['ls', '--json'], undefined, repo);
    if (r.code !== 0) {
      this.violation(`ls failed (exit ${r.code}): ${r.stderr.trim()}`);
      return undefined;
    }
    return JSON.parse(r.stdout) as LsVersion[];
  }

  /** Rolls the repository back to what a power cut could leave (see src/store/faulty.ts). */
  powerCut(): string {
    const cut = this.rng.chance(0.4) ? 0 : this.rng.next();
    const r = recoverPowerLoss(this.journal, { cut, tear: 0.5, random: () => this.rng.next() });
    // the second repository (copy's destination) is on the same machine: its pending writes go too
    const r2 = recoverPowerLoss(`${this.journal}-2`, { cut, tear: 0.5, random: () => this.rng.next() });
    this.server?.restart();
    return `power cut: ${r.undone + r2.undone} undone, ${r.kept + r2.kept} kept, ${r.torn.length + r2.torn.length} torn`;
  }
}

/** Runs a CLI binary other than this checkout's (the old code). */
function runWith(bin: string, args: string[], env: Record<string, string>): Promise<CliResult> {
  return import('node:child_process').then(
    ({ spawn }) =>
      new Promise((resolve, reject) => {
        const full: NodeJS.ProcessEnv = {};
        for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BLOCKSAFE_')) full[k] = v;
        Object.assign(full, env);
        const child = spawn(process.execPath, [bin, ...args], { env: full, stdio: ['ignore', 'pipe', 'pipe'] });
        const out: Buffer[] = [];
        const err: Buffer[] = [];
        child.stdout.on('data', (b: Buffer) => out.push(b));
        child.stderr.on('data', (b: Buffer) => err.push(b));
        child.on('error', reject);
        child.on('close', (code, signal) => resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
      }),
  );
}

export async function sha256Of(file: string): Promise<string> {
  return createHash('sha256')
    .update(await fs.readFile(file))
    .digest('hex');
}
