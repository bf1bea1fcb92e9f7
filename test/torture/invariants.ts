/**
 * The invariant checker: after any schedule, with no faults injected, proves what blocksafe promises.
 * 1. Every version a command reported done is still there; every version reported removed stays gone;
 *    every version maps to a source the harness made.
 * 2. Incomplete versions resume (backup --resume) and then count as complete.
 * 3. Every complete version restores byte-identical to its source (by sha256), unless it uses a block the
 *    harness damaged, when restore must say so (exit 3) instead.
 * 4. `scrub --all` reports exactly the damaged blocks the harness injected.
 * 5. After `cleanup --grace 0`, `check` is clean: no referenced object missing, no unknown object.
 * 6. `index rebuild` from the store alone finds every block and manifest whole and gives the same complete
 *    versions, tags, protection and expiry.
 * 7. Versions copied to the second repository restore identically there.
 * Each broken invariant is one line naming the seed, the step and what broke.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { sha256Of, type LsVersion, type World } from './world.js';

export async function checkInvariants(w: World): Promise<void> {
  w.steps.push({ n: w.steps.length + 1, what: 'invariants' });
  let versions = await w.ls();
  if (!versions) return;
  checkPresence(w, versions, 'after the schedule');

  // 2. resume the newest incomplete version of each name
  const resumed = new Set<string>();
  for (const v of versions) {
    if (v.complete || resumed.has(v.name)) continue;
    resumed.add(v.name);
    const src = w.sources.get(v.snapshot_name);
    if (!src) continue;
    const r = await w.cli(['backup', src.file, v.name, '--resume', '-s', src.id, '--json']);
    if (r.code !== 0) w.violation(`resume of incomplete version ${v.id} (${v.name}) failed (exit ${r.code}): ${r.stderr.trim()}`);
  }
  if (resumed.size) {
    versions = await w.ls();
    if (!versions) return;
  }

  // 3. restores (a sample of at most 3, newest first, to keep a schedule short)
  const complete = versions.filter((v) => v.complete);
  const sample = [...complete].sort(() => w.rng.next() - 0.5).slice(0, w.thorough ? 3 : 1);
  for (const v of sample) await verifyRestore(w, v, w.repo, 'invariant restore');

  // 4. scrub finds exactly the injected damage
  const scrub = await w.cli(['scrub', '--all', '--json']);
  if (scrub.code !== 0 && scrub.code !== 3) w.violation(`scrub --all failed (exit ${scrub.code}): ${scrub.stderr.trim()}`);
  else {
    const found = new Set((JSON.parse(scrub.stdout) as { damaged: { checksum: string }[] }).damaged.map((d) => d.checksum));
    const missed = [...w.damaged].filter((c) => !found.has(c));
    const extra = [...found].filter((c) => !w.damaged.has(c));
    if (missed.length || extra.length) w.violation(`scrub --all: damage injected at [${[...w.damaged].map(short)}], reported [${[...found].map(short)}]`);
    if ((scrub.code === 3) !== found.size > 0) w.violation(`scrub --all exit ${scrub.code} with ${found.size} damaged blocks`);
  }

  // 5. cleanup, then check is clean
  const cleanup = await w.cli(['cleanup', '--grace', '0', '--json']);
  if (cleanup.code !== 0) w.violation(`cleanup --grace 0 failed (exit ${cleanup.code}): ${cleanup.stderr.trim()}`);
  const check = await w.cli(['check', '--json']);
  if (check.code !== 0 && check.code !== 3) w.violation(`check failed (exit ${check.code}): ${check.stderr.trim()}`);
  else {
    const c = JSON.parse(check.stdout) as { missing_objects: string[]; unknown_objects: string[] };
    if (c.missing_objects.length) w.violation(`check after cleanup: ${c.missing_objects.length} referenced objects missing (${c.missing_objects.slice(0, 3).join(', ')})`);
    if (c.unknown_objects.length && cleanup.code === 0) w.violation(`check after cleanup: ${c.unknown_objects.length} unknown objects left (${c.unknown_objects.slice(0, 3).join(', ')})`);
  }

  // 6. index rebuild from the store alone (every other schedule in the short run)
  if (!w.thorough && w.rng.chance(0.5)) return checkCopies(w);
  const before = versions;
  const rebuild = await w.cli(['index', 'rebuild', '--json']);
  if (rebuild.code !== 0) w.violation(`index rebuild failed (exit ${rebuild.code}): ${rebuild.stderr.trim()}`);
  else {
    const rb = JSON.parse(rebuild.stdout) as { previous_index?: string | null; missing_blocks?: number; damaged_manifests?: unknown[] };
    if (rb.previous_index) await fs.rm(rb.previous_index, { recursive: true, force: true });
    // the store alone must be whole: every block a manifest names is there, every manifest reads
    if (rb.missing_blocks) w.violation(`index rebuild: ${rb.missing_blocks} blocks named by manifests are missing from the store`);
    if (rb.damaged_manifests?.length) w.violation(`index rebuild: damaged manifests ${JSON.stringify(rb.damaged_manifests).slice(0, 200)}`);
    const after = await w.ls();
    if (before && after) {
      // incomplete versions live only in the index (their manifest is written when they complete): a
      // rebuild from the store cannot know them, by design (docs/FORMAT.md)
      const a = describe(before.filter((v) => v.complete));
      const b = describe(after.filter((v) => v.complete));
      if (a !== b) w.violation(`index rebuild changed the versions: before ${a} after ${b}`);
    }
  }

  await checkCopies(w);
}

async function checkCopies(w: World): Promise<void> {
  // 7. the copies
  if (w.copied.size) {
    const there = await w.ls(w.repo2);
    if (there) {
      for (const id of w.copied) if (!there.some((v) => v.id === id)) w.violation(`version ${id} copied with exit 0 is not in the second repository`);
      const copies = there.filter((v) => v.complete);
      if (copies.length) await verifyRestore(w, w.rng.pick(copies), w.repo2, 'restore of a copy');
    }
  }
}

/** Versions that must be there are, removed ones are not, and each maps to a source of this schedule. */
export function checkPresence(w: World, versions: LsVersion[], when: string): void {
  const ids = new Set(versions.map((v) => v.id));
  for (const [id, why] of w.mustExist) if (!ids.has(id)) w.violation(`version ${id} (${why}) is gone ${when}`);
  for (const id of w.removed) if (ids.has(id)) w.violation(`version ${id} was removed (exit 0) but is back ${when}`);
  for (const v of versions) if (!w.sources.has(v.snapshot_name)) w.violation(`version ${v.id} has unknown snapshot name "${v.snapshot_name}"`);
}

/** Restores `v` and compares with its source; exit 0 with other bytes is always a violation. */
export async function verifyRestore(w: World, v: LsVersion, repo: string, what: string): Promise<void> {
  const src = w.sources.get(v.snapshot_name);
  if (!src) return;
  const target = path.join(w.dir, `restore-${w.commands}.img`);
  const r = await w.cli(['restore', v.id, target, '--json'], undefined, repo);
  try {
    if (r.code === 0) {
      const got = await sha256Of(target);
      if (got !== src.hash) w.violation(`${what}: version ${v.id} restored with exit 0 but differs from its source ${src.id}`);
    } else if (r.code === 3 && w.damaged.size > 0 && repo === w.repo) {
      // damage the harness injected: restore must name it, which exit 3 does
    } else {
      w.violation(`${what}: restore of ${v.id} (complete${v.valid ? '' : ', invalid'}) failed (exit ${r.code}): ${r.stderr.trim().split('\n').pop()}`);
    }
  } finally {
    await fs.rm(target, { force: true });
  }
}

function describe(vs: LsVersion[]): string {
  return JSON.stringify([...vs].sort((a, b) => a.id.localeCompare(b.id)).map((v) => [v.id, v.name, v.complete ? 'c' : 'i', v.protected ? 'p' : '', [...v.tags].sort().join('+'), v.expire ?? '']));
}

const short = (c: string) => c.slice(0, 8);
