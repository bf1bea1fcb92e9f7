import { ObjectType } from '../codec/object.js';
import { FormatError, IntegrityError, RefusedError, UsageError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { ObjectNames } from '../store/blobstore.js';
import type { Repository } from './repository.js';

/**
 * Version bookkeeping: tags, protection, expiry. Each change is written to the index and to the version's
 * attributes object in the store (`attributes/<id>`), so an index rebuild restores it.
 */
export const ATTRIBUTES_FORMAT = 1;

export interface VersionAttributes {
  attributes_format: 1;
  id: string;
  /** Incremented on every write: an older object put back (undoing a protect) is noticed. */
  generation: number;
  tags: string[];
  protected: boolean;
  expire: string | null;
  valid: boolean;
}

/** Writes the version's attributes object with the next generation (recorded in the index first). */
export async function writeAttributes(repo: Repository, v: VersionRecord): Promise<void> {
  const next = await repo.index.updateVersion(v.id, (x) => {
    x.attributes_generation = (x.attributes_generation ?? 0) + 1;
    // Until the store holds this generation, the next index sync must read the object and see it is older
    // (a crash or power loss between here and the put left the old one, whose mtime it would otherwise trust).
    x.attributes_mtime = undefined;
  });
  const attrs: VersionAttributes = {
    attributes_format: ATTRIBUTES_FORMAT,
    id: next.id,
    generation: next.attributes_generation!,
    tags: next.tags,
    protected: next.protected,
    expire: next.expire,
    valid: next.valid,
  };
  const name = ObjectNames.attributes(v.id);
  await repo.store.put(name, repo.encodeMeta(ObjectType.Attributes, Buffer.from(JSON.stringify(attrs)), name));
  await repo.store.sync();
  repo.trust.noteAttributes(repo.id, [[v.id, attrs.generation]]);
}

/** The attributes of version `id`, checked field by field, or undefined when there are none. */
export async function readAttributes(repo: Repository, id: string): Promise<VersionAttributes | undefined> {
  const name = ObjectNames.attributes(id);
  const raw = await repo.store.tryGet(name);
  if (!raw) return undefined;
  let a: VersionAttributes;
  try {
    a = JSON.parse(repo.decodeMeta(ObjectType.Attributes, raw, name, 2 ** 20).toString('utf8')) as VersionAttributes;
  } catch (err) {
    if (err instanceof SyntaxError) throw new IntegrityError(`The attributes of version ${id} are damaged (not JSON).`);
    throw err;
  }
  if (typeof a?.attributes_format === 'number' && a.attributes_format > ATTRIBUTES_FORMAT) {
    throw new FormatError(`The attributes of version ${id} have format ${a.attributes_format}, newer than this blocksafe understands (${ATTRIBUTES_FORMAT}); use a newer blocksafe.`);
  }
  const ok =
    a?.attributes_format === ATTRIBUTES_FORMAT &&
    a.id === id &&
    Array.isArray(a.tags) &&
    a.tags.every((t) => typeof t === 'string' && t.length <= 64) &&
    typeof a.protected === 'boolean' &&
    typeof a.valid === 'boolean' &&
    (a.expire === null || (typeof a.expire === 'string' && !Number.isNaN(Date.parse(a.expire))));
  if (!ok) throw new IntegrityError(`The attributes of version ${id} are damaged or malformed.`);
  a.generation = Number.isInteger(a.generation) ? a.generation : 0;
  return a;
}

async function change(repo: Repository, id: string, fn: (v: VersionRecord) => void): Promise<VersionRecord> {
  const v = await repo.index.updateVersion(id, fn);
  await writeAttributes(repo, v);
  return repo.index.getVersion(id) ?? v;
}

export function validateTag(tag: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,63}$/.test(tag)) throw new UsageError(`Invalid tag "${tag}": use letters, digits and . _ : @ + - (at most 64 characters).`);
}

export function addTags(repo: Repository, id: string, tags: string[]): Promise<VersionRecord> {
  tags.forEach(validateTag);
  return change(repo, id, (v) => (v.tags = [...new Set([...v.tags, ...tags])]));
}

export function removeTags(repo: Repository, id: string, tags: string[]): Promise<VersionRecord> {
  return change(repo, id, (v) => (v.tags = v.tags.filter((t) => !tags.includes(t))));
}

export function setProtected(repo: Repository, id: string, value: boolean): Promise<VersionRecord> {
  return change(repo, id, (v) => (v.protected = value));
}

/** Sets (or with null clears) the expiry date. */
export function setExpire(repo: Repository, id: string, when: Date | null): Promise<VersionRecord> {
  return change(repo, id, (v) => (v.expire = when ? when.toISOString() : null));
}

/** Attributes of the validity flag changed by scrub or healing. */
export async function syncValidity(repo: Repository, ids: string[]): Promise<void> {
  for (const id of ids) {
    const v = repo.index.getVersion(id);
    if (v) await writeAttributes(repo, v);
  }
}

/** Parses an expiry date: ISO-8601 / "YYYY-MM-DD [HH:MM[:SS]]" (local time), or "never". */
export function parseDate(text: string): Date | null {
  if (/^(never|none)$/i.test(text)) return null;
  const local = /^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2}))?)?$/.exec(text);
  const d = local ? new Date(Number(local[1]), Number(local[2]) - 1, Number(local[3]), Number(local[4] ?? 0), Number(local[5] ?? 0), Number(local[6] ?? 0)) : new Date(text);
  if (Number.isNaN(d.getTime())) throw new UsageError(`Invalid date "${text}": use YYYY-MM-DD, "YYYY-MM-DD HH:MM" (local time), ISO-8601, or "never".`);
  return d;
}

/** Refuses removal of versions younger than the configured minimum age (backy2's guard against mistakes). */
export function assertOldEnough(v: VersionRecord, minAgeDays: number, force: boolean, now = Date.now()): void {
  if (force || minAgeDays <= 0) return;
  const ageDays = (now - Date.parse(v.date)) / 86400e3;
  if (ageDays < minAgeDays) {
    throw new RefusedError(`Version ${v.id} is only ${ageDays.toFixed(1)} days old (minimum age for removal: ${minAgeDays} days); use --force to remove it anyway. Nothing was removed.`);
  }
}

export const AUTO_TAGS = ['b_daily', 'b_weekly', 'b_monthly'] as const;

/** Calendar bucket keys in local time: day, ISO week, month. */
export function calendarKey(date: Date, unit: 'hour' | 'day' | 'week' | 'month' | 'year'): string {
  const y = date.getFullYear();
  const m = date.getMonth() + 1;
  const d = date.getDate();
  switch (unit) {
    case 'hour':
      return `${y}-${m}-${d}T${date.getHours()}`;
    case 'day':
      return `${y}-${m}-${d}`;
    case 'week': {
      // ISO 8601 week: weeks start on Monday; the week's Thursday decides its year.
      const t = new Date(Date.UTC(y, m - 1, d));
      t.setUTCDate(t.getUTCDate() + 4 - (t.getUTCDay() || 7));
      const yearStart = Date.UTC(t.getUTCFullYear(), 0, 1);
      return `${t.getUTCFullYear()}-W${Math.ceil(((t.getTime() - yearStart) / 86400e3 + 1) / 7)}`;
    }
    case 'month':
      return `${y}-${m}`;
    case 'year':
      return `${y}`;
  }
}

/**
 * backy2's automatic tags: a new version gets b_daily / b_weekly / b_monthly when no other version of the
 * same name carries that tag in the same local day / ISO week / month.
 */
export function autoTagsFor(repo: Repository, v: VersionRecord): string[] {
  const units = { b_daily: 'day', b_weekly: 'week', b_monthly: 'month' } as const;
  const date = new Date(v.date);
  const out: string[] = [];
  for (const tag of AUTO_TAGS) {
    const key = calendarKey(date, units[tag]);
    let taken = false;
    for (const o of repo.index.allVersions()) {
      if (o.id !== v.id && o.name === v.name && o.tags.includes(tag) && calendarKey(new Date(o.date), units[tag]) === key) {
        taken = true;
        break;
      }
    }
    if (!taken) out.push(tag);
  }
  return out;
}
