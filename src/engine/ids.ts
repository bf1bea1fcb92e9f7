import { randomBytes } from 'node:crypto';

/** Lowercase letters and digits without look-alikes (no 0/o, 1/l/i), so ids read aloud at 3 a.m. survive. */
const ALPHABET = 'abcdefghjkmnpqrstuvwxyz23456789';

/** A new version id: 8 characters, ~39 bits; collisions are checked against the index by the caller. */
export function newVersionId(): string {
  const bytes = randomBytes(8);
  let id = '';
  for (const b of bytes) id += ALPHABET[b % ALPHABET.length];
  return id;
}

/**
 * Whether `id` can be a version id: lowercase letters and digits only. Ids arrive from import files,
 * manifests and the command line and become object names, so nothing else may pass.
 */
export function isVersionId(id: unknown): id is string {
  return typeof id === 'string' && /^[a-z0-9]{1,64}$/.test(id);
}
