import { FormatError, RefusedError, UsageError } from '../errors.js';
import type { VersionRecord } from '../index/records.js';
import { isoLocal } from '../util/time.js';
import { validateName } from './backup.js';
import { validateTag } from './lifecycle.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { isVersionId } from './ids.js';
import { LockNames, withLock } from './locks.js';
import type { ProgressListener } from './progress.js';
import type { Repository } from './repository.js';
import { versionJson, type VersionJson } from './versionJson.js';
import { withVersionWriter, type BlockOutcome } from './versionWriter.js';

/**
 * Moving versions between repositories.
 *
 * export/import carry version metadata only — everything: name, dates, tags, protection, expiry, stats and
 * the whole block map — as documented JSON (docs/CLI.md); import refuses a version whose blocks the
 * repository does not hold. copy moves whole versions with their blocks to another repository (another
 * store, other keys): block identities differ between repositories (keyed MACs), so each block is read,
 * verified, re-identified and stored in the destination, except when the destination already knows the
 * translation (a previous copy) and holds the block: then nothing is read or sent.
 */
export const EXPORT_FORMAT = 1;

export interface ExportedVersion {
  format: 'blocksafe-version-export';
  format_version: number;
  repository_id: string;
  exported: string;
  /** The version as `show --json` prints it (its progress fields are meaningless elsewhere and ignored). */
  version: VersionJson;
  /** One entry per block: the hex checksum, or null for a sparse block. */
  blocks: (string | null)[];
}

export function exportVersion(repo: Repository, v: VersionRecord): ExportedVersion {
  if (!v.complete) throw new RefusedError(`Version ${v.id} is incomplete; only complete versions can be exported.`);
  const count = Math.ceil(v.size / v.block_size);
  const cursor = repo.index.mapCursor(v.id, count);
  const blocks: (string | null)[] = [];
  for (let i = 0; i < count; i++) blocks.push(cursor.get(i)?.toString('hex') ?? null);
  return {
    format: 'blocksafe-version-export',
    format_version: EXPORT_FORMAT,
    repository_id: repo.id,
    exported: isoLocal(new Date()),
    version: versionJson(v),
    blocks,
  };
}

function checkExport(data: unknown): ExportedVersion {
  const e = data as ExportedVersion;
  if (typeof e !== 'object' || e === null || e.format !== 'blocksafe-version-export') throw new FormatError('This is not a blocksafe version export (wrong or missing "format").');
  if (e.format_version > EXPORT_FORMAT) throw new FormatError(`The export has format ${e.format_version}, newer than this blocksafe understands (${EXPORT_FORMAT}); use a newer blocksafe.`);
  const v = e.version;
  if (!v || typeof v.id !== 'string' || typeof v.size !== 'number' || typeof v.block_size !== 'number' || !Array.isArray(e.blocks)) {
    throw new FormatError('The export is incomplete (version fields or block list missing); was it truncated?');
  }
  // Everything below becomes index entries, object names and dates: an export file is untrusted input.
  if (!isVersionId(v.id)) throw new FormatError(`The export names version "${String(v.id).slice(0, 40)}", which is not a version id (lowercase letters and digits); nothing was imported.`);
  if (!Number.isSafeInteger(v.size) || v.size < 0 || !Number.isSafeInteger(v.block_size) || v.block_size <= 0)
    throw new FormatError('The export has an impossible size or block size; nothing was imported.');
  if (typeof v.name !== 'string' || typeof v.source !== 'string' || typeof v.snapshot_name !== 'string' || !Array.isArray(v.tags) || v.tags.some((t) => typeof t !== 'string')) {
    throw new FormatError('The export has malformed version fields (name, source, snapshot name or tags); nothing was imported.');
  }
  if (Number.isNaN(Date.parse(v.date)) || (v.expire !== null && Number.isNaN(Date.parse(String(v.expire))))) throw new FormatError('The export has a malformed date; nothing was imported.');
  if (v.base !== null && !isVersionId(v.base)) throw new FormatError('The export names a malformed base version; nothing was imported.');
  if (e.blocks.length !== Math.ceil(v.size / v.block_size))
    throw new FormatError(`The export lists ${e.blocks.length} blocks but its size needs ${Math.ceil(v.size / v.block_size)}; was it truncated?`);
  for (const b of e.blocks) if (b !== null && !/^[0-9a-f]{64}$/.test(b)) throw new FormatError(`The export has a malformed block checksum "${String(b).slice(0, 20)}".`);
  return e;
}

/** Imports exported version metadata; every non-sparse block must already be in this repository. */
export async function importVersion(repo: Repository, pipeline: BlockPipeline, data: unknown): Promise<VersionRecord> {
  const e = checkExport(data);
  const v = e.version;
  validateName(v.name);
  v.tags.forEach(validateTag);
  if (v.block_size !== repo.blockSize) throw new RefusedError(`The exported version has block size ${v.block_size}, this repository ${repo.blockSize}; it cannot be imported here.`);
  const existing = repo.index.getVersion(v.id);
  if (existing?.complete) throw new RefusedError(`Version ${v.id} already exists in this repository; nothing was imported.`);
  const missing = new Set(e.blocks.filter((b): b is string => b !== null && !repo.index.getBlock(Buffer.from(b, 'hex')))).size;
  if (missing > 0) {
    const foreign = e.repository_id !== repo.id ? ` (it was exported from repository ${e.repository_id}; use "blocksafe copy" to move versions with their blocks)` : '';
    throw new RefusedError(`${missing} of the version's blocks are missing from this repository${foreign}; nothing was imported.`);
  }
  const fields = { ...carriedFields(v), base: v.base, date: new Date(v.date).toISOString() };
  return withLock(repo.locks, LockNames.volume(v.name), 'exclusive', `Volume "${v.name}"`, () =>
    withVersionWriter(repo, pipeline, fields, async (writer) => {
      for (const [i, hex] of e.blocks.entries()) {
        const length = Math.min(v.block_size, v.size - i * v.block_size);
        if (hex === null) await writer.record(i, { kind: 'sparse', length });
        else {
          const checksum = Buffer.from(hex, 'hex');
          await pipeline.retain(checksum);
          // Checked again now that it is held: a cleanup may have deleted it since the check above.
          if (!repo.index.getBlock(checksum)) {
            await writer.abandon();
            throw new RefusedError(`Block ${hex.slice(0, 16)}… of the version was deleted by a cleanup while importing; nothing was imported.`);
          }
          await writer.record(i, { kind: 'referenced', length, checksum });
        }
      }
      // Keep the original backup's statistics and bookkeeping, not those of the import.
      Object.assign(writer.version, { expire: v.expire ? new Date(v.expire).toISOString() : null, valid: v.valid });
      return writer.finish({ stats: v.stats });
    }),
  );
}

export interface CopyOptions {
  queueDepth: number;
  onProgress?: ProgressListener;
}

export interface CopyResult {
  version: VersionRecord;
  /** Blocks read from the source and sent to the destination (new there). */
  blocks_sent: number;
  bytes_sent: number;
  /** Blocks the destination already had. */
  blocks_known: number;
  /** True when the destination already held the complete version: nothing was done. */
  already_there: boolean;
}

/**
 * Copies a version with its blocks from `src` to `dst`. Resumable: an interrupted copy left an incomplete
 * version with the same id in the destination, which the next copy continues.
 */
export async function copyVersion(src: Repository, srcPipe: BlockPipeline, dst: Repository, dstPipe: BlockPipeline, v: VersionRecord, opts: CopyOptions): Promise<CopyResult> {
  if (!v.complete) throw new RefusedError(`Version ${v.id} is incomplete; only complete versions can be copied.`);
  if (src.id === dst.id) throw new UsageError('The destination is the same repository as the source.');
  if (v.block_size !== dst.blockSize) {
    throw new RefusedError(`Version ${v.id} has block size ${v.block_size} but the destination uses ${dst.blockSize}; create the destination with --block-size ${v.block_size}.`);
  }
  const existing = dst.index.getVersion(v.id);
  if (existing?.complete) return { version: existing, blocks_sent: 0, bytes_sent: 0, blocks_known: 0, already_there: true };
  if (existing && existing.source !== v.source) throw new RefusedError(`The destination has an unrelated version with id ${v.id}; nothing was copied.`);
  return withLock(src.locks, LockNames.version(v.id), 'shared', `Version ${v.id}`, () =>
    withLock(dst.locks, LockNames.volume(v.name), 'exclusive', `Volume "${v.name}" in the destination`, () =>
      withVersionWriter(dst, dstPipe, existing ?? { ...carriedFields(v), base: null, date: v.date }, async (writer) => {
        const result: CopyResult = { version: writer.version, blocks_sent: 0, bytes_sent: 0, blocks_known: 0, already_there: false };
        const cursor = src.index.mapCursor(v.id, Math.ceil(v.size / v.block_size));
        const blocks = writer.blocks;
        const translations: [Buffer, Buffer][] = [];
        await orderedWindow<BlockOutcome>(
          blocks,
          opts.queueDepth,
          async (i) => {
            const length = Math.min(v.block_size, v.size - i * v.block_size);
            const checksum = cursor.get(i);
            if (!checksum) return { kind: 'sparse', length };
            const known = dst.index.getTranslation(src.id, checksum);
            if (known) {
              await dstPipe.retain(known);
              if (dst.index.getBlock(known)?.valid) return { kind: 'referenced', length, checksum: known };
            }
            const plain = await srcPipe.load(checksum, length);
            const { data, checksum: mine } = await dstPipe.digest(plain);
            if (!mine) return { kind: 'sparse', length };
            translations.push([checksum, mine]);
            const { record, written } = await dstPipe.store(data, mine);
            return { kind: 'data', length, checksum: mine, record, written };
          },
          async (i, out) => {
            if (out.kind === 'data' && out.written) {
              result.blocks_sent++;
              result.bytes_sent += out.record.stored;
            } else if (out.kind !== 'sparse') result.blocks_known++;
            await writer.record(i, out);
            if (translations.length >= 256) await dst.index.putTranslations(src.id, translations.splice(0));
            opts.onProgress?.({ phase: 'copy', doneBytes: Math.min(v.size, (i + 1) * v.block_size), totalBytes: v.size, damaged: 0 });
          },
          writer.first,
        );
        await dst.index.putTranslations(src.id, translations);
        Object.assign(writer.version, { expire: v.expire, valid: v.valid });
        result.version = await writer.finish({ stats: v.stats });
        return result;
      }),
    ),
  );
}

/** What a version keeps when it moves to another repository (import, copy). */
function carriedFields(v: Pick<VersionRecord, 'id' | 'name' | 'size' | 'source' | 'snapshot_name' | 'tags' | 'protected'>) {
  return { id: v.id, name: v.name, size: v.size, source: v.source, snapshotName: v.snapshot_name, tags: v.tags, protected: v.protected };
}
