import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { IntegrityError } from '../errors.js';

/**
 * What this machine remembers about each repository it opened (borg's security directory): whether it
 * was encrypted, and the highest keyring generation seen. Kept outside the repository, in
 * `<state dir>/trust/<repository id>.json`, so that someone who can edit the repository (the USB disk, the
 * bucket) cannot make this machine accept a downgrade to "encryption: none" or an old keyring put back.
 * A machine that never saw the repository (a rescue system) has no record and trusts on first use.
 */
export interface TrustRecord {
  trust_format: 1;
  repository_id: string;
  encryption: string;
  keyring_generation: number;
  first_seen: string;
  /** Highest attributes generation seen per version: an old attributes object put back is noticed even after the index is lost. */
  attributes?: Record<string, number>;
}

export class TrustStore {
  constructor(readonly dir: string | null) {}

  private file(id: string): string | null {
    return this.dir && /^[A-Za-z0-9-]{1,64}$/.test(id) ? path.join(this.dir, `${id}.json`) : null;
  }

  /** How a user who put an old copy back on purpose tells this machine to accept it. */
  private forget(id: string): string {
    const file = this.file(id);
    return file ? `If you restored an older copy of the repository on purpose, delete ${file} and run the command again.` : '';
  }

  read(id: string): TrustRecord | null {
    const file = this.file(id);
    if (!file) return null;
    try {
      const r = JSON.parse(readFileSync(file, 'utf8')) as TrustRecord;
      return r.trust_format === 1 && r.repository_id === id ? r : null;
    } catch {
      return null;
    }
  }

  /**
   * Checks what the repository claims now against the record, then records it (best effort: a read-only
   * rescue system simply has no memory).
   */
  check(id: string, encryption: string, keyringGeneration: number): void {
    const prev = this.read(id);
    if (prev && prev.encryption !== 'none' && encryption === 'none') {
      throw new IntegrityError(
        `The repository ${id} was encrypted when this machine last opened it, but now claims "encryption: none": its descriptor or keyring was replaced. Nothing was read or written; restore the repository from a trusted copy. ${this.forget(id)}`,
      );
    }
    if (prev && keyringGeneration < prev.keyring_generation) {
      throw new IntegrityError(
        `The keyring of repository ${id} is older (generation ${keyringGeneration}) than one this machine already saw (${prev.keyring_generation}): an old keyring was put back. Nothing was read or written. ${this.forget(id)}`,
      );
    }
    if (prev && prev.encryption === encryption && prev.keyring_generation === keyringGeneration) return;
    this.write({
      ...prev,
      trust_format: 1,
      repository_id: id,
      encryption,
      keyring_generation: Math.max(keyringGeneration, prev?.keyring_generation ?? 0),
      first_seen: prev?.first_seen ?? new Date().toISOString(),
    });
  }

  /** The highest attributes generation of version `versionId` this machine has seen (0: none). */
  attributesGeneration(id: string, versionId: string): number {
    return this.read(id)?.attributes?.[versionId] ?? 0;
  }

  /** The versions whose attributes this machine saw (complete versions not removed by this machine). */
  knownVersions(id: string): string[] {
    return Object.keys(this.read(id)?.attributes ?? {});
  }

  /** Remembers attributes generations (only ever upwards); null removes a version's entry (rm). */
  noteAttributes(id: string, entries: [string, number | null][]): void {
    const prev = this.read(id);
    if (!prev || entries.length === 0) return;
    const attributes = { ...prev.attributes };
    let changed = false;
    for (const [v, g] of entries) {
      if (g === null) changed = delete attributes[v] || changed;
      else if (g > (attributes[v] ?? 0)) {
        attributes[v] = g;
        changed = true;
      }
    }
    if (changed) this.write({ ...prev, attributes });
  }

  private write(record: TrustRecord): void {
    const file = this.file(record.repository_id);
    if (!file) return;
    try {
      mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
      const tmp = `${file}.${process.pid}.tmp`;
      writeFileSync(tmp, JSON.stringify(record, null, 2) + '\n', { mode: 0o600 });
      renameSync(tmp, file);
    } catch {
      // not writable here: nothing remembered
    }
  }
}
