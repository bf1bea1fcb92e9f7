import { versionJson } from '../engine/versionJson.js';
import type { VersionRecord } from '../index/records.js';
import type { NbdExport } from '../nbd/export.js';
import { isoLocal } from '../util/time.js';
import { TreeBuilder, type DataSource, type FsNode } from './node.js';

/**
 * The tree `blocksafe mount` shows (docs/MOUNT.md):
 *   by_id/<id>/data          the version's image, read through the same export code as `blocksafe nbd`
 *   by_id/<id>/info.json     `show --json` of the version
 *   by_id/<id>/{name,snapshot_name,tags,valid,expire,protected}   backy2's small files, one value a line
 *   by_name/<name>/<local date>_<time>_<id> -> ../../by_id/<id>   oldest first
 *   by_name/<name>/latest    -> the newest of them
 */
export function versionTree(exports: readonly NbdExport[]): ReadonlyMap<number, FsNode> {
  const newestTime = Math.max(0, ...exports.map((e) => Date.parse(e.version.date) / 1000));
  const t = new TreeBuilder(newestTime);
  const byId = t.dir(t.root, 'by_id', newestTime);
  const byName = t.dir(t.root, 'by_name', newestTime);
  const sorted = [...exports].sort((a, b) => Date.parse(a.version.date) - Date.parse(b.version.date) || a.version.id.localeCompare(b.version.id));
  for (const e of sorted) {
    const v = e.version;
    const time = Date.parse(v.date) / 1000;
    const d = t.dir(byId, v.id, time);
    t.data(d, 'data', time, dataSource(e));
    t.file(d, 'info.json', time, JSON.stringify(versionJson(v), null, 2) + '\n');
    for (const [name, value] of Object.entries(smallFiles(v))) t.file(d, name, time, value);
  }
  const volumes = new Map<string, NbdExport[]>();
  for (const e of sorted) volumes.set(e.version.name, [...(volumes.get(e.version.name) ?? []), e]);
  for (const [name, list] of volumes) {
    const time = Date.parse(list[list.length - 1]!.version.date) / 1000;
    const d = t.dir(byName, name, time);
    for (const e of list) t.link(d, linkName(e.version), Date.parse(e.version.date) / 1000, `../../by_id/${e.version.id}`);
    t.link(d, 'latest', time, `../../by_id/${list[list.length - 1]!.version.id}`);
  }
  return t.nodes;
}

/** backy2's metadata files: the value and a newline (tags one a line, empty files for "none"). */
export function smallFiles(v: VersionRecord): Record<string, string> {
  const j = versionJson(v);
  const line = (s: string | null) => (s ? `${s}\n` : '');
  return {
    name: line(j.name),
    snapshot_name: line(j.snapshot_name),
    tags: j.tags.map((tag) => `${tag}\n`).join(''),
    valid: `${j.valid}\n`,
    expire: line(j.expire),
    protected: `${j.protected}\n`,
  };
}

/** "2026-12-03_06:14:05_<id>": sorts by time within a volume, readable, no spaces. */
export function linkName(v: VersionRecord): string {
  const iso = isoLocal(new Date(v.date));
  return `${iso.slice(0, 10)}_${iso.slice(11, 19)}_${v.id}`;
}

/** Blocks loaded ahead of a sequential reader (the shared cache holds at least 2, up to 8). */
const PREFETCH_BLOCKS = 2;

function dataSource(e: NbdExport): DataSource {
  // Ends of recent reads: a read starting at one of them is sequential (the kernel sends several at once).
  const ends: number[] = [];
  const read = (offset: number, length: number) => {
    if (ends.includes(offset)) e.prefetch(offset + length, PREFETCH_BLOCKS * e.blockSize);
    ends.push(offset + length);
    if (ends.length > 16) ends.shift();
    return e.read(offset, length);
  };
  return {
    size: e.size,
    writable: !e.readOnly,
    // Sparse blocks take no space; blocks taken by reference from a base count as stored.
    allocated: Math.max(0, e.size - e.version.stats.bytes_sparse),
    read,
    write: (offset, data) => e.write(offset, data, false),
    flush: () => e.flush(),
    seek: (offset, hole) => {
      let at = offset;
      for (const x of e.extents(offset, e.size - offset, 2)) {
        if ((x.flags !== 0) === hole) return at;
        at += x.length;
      }
      return at < e.size ? at : null;
    },
  };
}
