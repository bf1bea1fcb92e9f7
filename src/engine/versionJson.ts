import type { VersionRecord } from '../index/records.js';
import { isoLocal } from '../util/time.js';

/**
 * The stable JSON form of a version (docs/CLI.md): `ls/show/backup --json`, the TUI and version exports all
 * use it. Dates are ISO-8601 with the local UTC offset.
 */
export function versionJson(v: VersionRecord) {
  return {
    id: v.id,
    name: v.name,
    snapshot_name: v.snapshot_name,
    date: isoLocal(new Date(v.date)),
    size: v.size,
    block_size: v.block_size,
    valid: v.valid,
    complete: v.complete,
    blocks_done: v.blocks_done,
    protected: v.protected,
    tags: v.tags,
    expire: v.expire ? isoLocal(new Date(v.expire)) : null,
    source: v.source,
    base: v.base,
    stats: v.stats,
  };
}

export type VersionJson = ReturnType<typeof versionJson>;
