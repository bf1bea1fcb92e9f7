import type { VersionRecord } from '../index/records.js';
import { calendarKey } from './lifecycle.js';

/** How many versions to keep per volume name; 0 means the rule is off. */
export interface RetentionPolicy {
  last: number;
  hourly: number;
  daily: number;
  weekly: number;
  monthly: number;
  yearly: number;
}

export const RULES = ['hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const;
const UNIT = { hourly: 'hour', daily: 'day', weekly: 'week', monthly: 'month', yearly: 'year' } as const;

export function policyIsEmpty(p: RetentionPolicy): boolean {
  return p.last + p.hourly + p.daily + p.weekly + p.monthly + p.yearly === 0;
}

export function describePolicy(p: RetentionPolicy): string {
  const parts = (['last', ...RULES] as const).filter((k) => p[k] > 0).map((k) => `${k} ${p[k]}`);
  return parts.length ? parts.join(', ') : 'none';
}

export interface PruneDecision {
  version: VersionRecord;
  keep: boolean;
  reasons: string[];
}

/**
 * The retention plan for the versions of ONE volume name, computed in local time:
 * - keep-last N keeps the N newest complete versions;
 * - keep-daily N (hourly, weekly (ISO weeks), monthly, yearly alike) keeps the newest version of each of the
 *   N most recent calendar days that have a version;
 * - protected versions are always kept; expired versions (expiry date passed) are removed unless protected,
 *   and take no slot of any rule (the newest unexpired version of a day is that day's);
 * - an incomplete version is kept only while it is newer than every complete one (it can be resumed).
 * Pure: the caller applies it.
 */
export function planPrune(versions: VersionRecord[], policy: RetentionPolicy, now = Date.now()): PruneDecision[] {
  const sorted = [...versions].sort((a, b) => b.date.localeCompare(a.date));
  const decisions = new Map<string, PruneDecision>(sorted.map((v) => [v.id, { version: v, keep: false, reasons: [] }]));
  const expired = (v: VersionRecord) => v.expire !== null && Date.parse(v.expire) <= now;
  // Versions on their way out (expired, unprotected) take no bucket or keep-last slot from the others.
  const complete = sorted.filter((v) => v.complete && !(expired(v) && !v.protected));
  complete.slice(0, policy.last).forEach((v, i) => decisions.get(v.id)!.reasons.push(`last ${i + 1}`));
  for (const rule of RULES) {
    const n = policy[rule];
    if (n <= 0) continue;
    let lastKey: string | null = null;
    let count = 0;
    for (const v of complete) {
      if (count >= n) break;
      const key = calendarKey(new Date(v.date), UNIT[rule]);
      if (key === lastKey) continue;
      lastKey = key;
      count++;
      decisions.get(v.id)!.reasons.push(`${rule} ${key}`);
    }
  }
  const newestComplete = complete[0]?.date ?? '';
  for (const d of decisions.values()) {
    const v = d.version;
    if (v.protected) {
      d.keep = true;
      d.reasons.unshift('protected');
    } else if (expired(v)) {
      d.keep = false;
      d.reasons = ['expired'];
    } else if (!v.complete) {
      d.keep = v.date > newestComplete;
      d.reasons = [d.keep ? 'incomplete, resumable' : 'incomplete, superseded'];
    } else {
      d.keep = d.reasons.length > 0;
    }
  }
  return [...decisions.values()];
}
