import { createOverlayVersion } from '../engine/overlayVersion.js';
import type { BlockPipeline } from '../engine/blockPipeline.js';
import type { Repository } from '../engine/repository.js';
import { UsageError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import type { NbdExport } from '../nbd/export.js';
import { GRANULE } from '../nbd/overlay.js';
import { formatBytes } from '../util/size.js';
import { versionJson } from './output.js';
import { progressReporter } from './progressLine.js';

/**
 * What `nbd --rw` and `mount --rw` share at the end of a session: the overlay of one export kept as a new
 * protected version (--keep-as), or the report that the overlays were discarded.
 */
export async function keepOverlay(repo: Repository, pipeline: BlockPipeline, exp: NbdExport, opts: { keepAs: string; queueDepth: number; json: boolean }): Promise<void> {
  const v = exp.version;
  await exp.flush();
  const overlay = exp.overlay!;
  if (!opts.json) process.stderr.write(`Saving the overlay (${formatBytes(overlay.changedGranules() * GRANULE)} changed) as a new version of "${opts.keepAs}"…\n`);
  const progress = progressReporter(!opts.json);
  const kept = await createOverlayVersion(
    repo,
    pipeline,
    v,
    { touches: (o, l) => overlay.touches(o, l), read: (o, l) => exp.read(o, l) },
    { name: opts.keepAs, queueDepth: opts.queueDepth, onProgress: progress.listener },
  );
  progress.done();
  if (opts.json) process.stdout.write(JSON.stringify({ event: 'kept', version: versionJson(kept) }) + '\n');
  else {
    process.stderr.write(
      `Kept the overlay of ${v.id} as protected version ${kept.id} of "${kept.name}": ${kept.stats.blocks_written} new blocks stored, ` + `${kept.stats.blocks_referenced} shared with ${v.id}.\n`,
    );
    process.stdout.write(`${kept.id}\n`);
  }
}

export function reportDiscarded(exports: readonly NbdExport[]): void {
  const changed = exports.reduce((n, e) => n + (e.overlay?.changedGranules() ?? 0), 0) * GRANULE;
  process.stderr.write(`Discarded the overlay (${formatBytes(changed)} written); the backup is unchanged.\n`);
}

/** Resolves with the first SIGINT or SIGTERM after the previous one was handled; `cancel` removes the handlers. */
export function waitForSignal(): Promise<NodeJS.Signals> & { cancel: () => void } {
  let on: (s: NodeJS.Signals) => void = () => undefined;
  const p = new Promise<NodeJS.Signals>((resolve) => {
    on = (s) => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
      resolve(s);
    };
    process.on('SIGINT', on);
    process.on('SIGTERM', on);
  });
  return Object.assign(p, {
    cancel: () => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
    },
  });
}

/** --keep-as saves the overlay of exactly one version, under a volume name other than that version's. */
export function checkKeepAs(versions: readonly VersionRecord[], keepAs: string | undefined, served: string): void {
  if (!keepAs) return;
  if (versions.length !== 1)
    throw new UsageError(`--keep-as needs exactly one VERSION to ${served} (${versions.length} would be ${served === 'serve' ? 'served' : 'mounted'}); name the version to modify.`);
  // Backups of a volume take its newest version as their base (and trust change hints against it).
  if (keepAs === versions[0]!.name) {
    throw new UsageError(`--keep-as needs a volume name other than "${keepAs}", so that backups of "${keepAs}" do not build on the edited copy; e.g. --keep-as ${keepAs}-edited.`);
  }
}
