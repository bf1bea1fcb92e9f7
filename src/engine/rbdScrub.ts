/**
 * Deep scrub against an RBD image: a full `rbd export-diff` of the image (or of the snapshot the URI names)
 * is compared block by block with a version's map. Unlisted extents of a full export-diff are zeros.
 */
import type { VersionRecord } from '../index/records.js';
import { BlockPipeline, orderedWindow } from './blockPipeline.js';
import { parseRbdUri, imageSpec, type RbdClient } from './rbd.js';
import { DiffBlocks } from './rbdBlocks.js';
import { ByteReader, RbdDiffError, RbdDiffReader } from './rbdDiff.js';
import type { Repository } from './repository.js';
import type { SourceDifference } from './scrub.js';
import { NotFoundError } from '../errors.js';

export async function compareWithRbd(repo: Repository, pipeline: BlockPipeline, client: RbdClient, v: VersionRecord, uri: string, queueDepth: number): Promise<SourceDifference[]> {
  const spec = parseRbdUri(uri);
  const info = await client.info(spec, spec.snap);
  if (!info) throw new NotFoundError(`RBD image "${imageSpec(spec, null)}" does not exist; check the name with \`rbd ls ${spec.pool}\`.`);
  const bs = v.block_size;
  const total = Math.max(info.size, v.size);
  const cursor = repo.index.mapCursor(v.id, Math.ceil(v.size / bs));
  const diffs: SourceDifference[] = [];
  const proc = client.exportDiff(spec, spec.snap, null);
  try {
    const reader = new RbdDiffReader(new ByteReader(proc.chunks), info.size);
    await reader.meta();
    const blocks = new DiffBlocks(reader, bs, info.size);
    await orderedWindow<boolean>(
      Math.ceil(total / bs),
      queueDepth,
      async (i) => {
        const inVersion = i * bs < v.size;
        const inSource = i * bs < info.size;
        const t = inSource ? await blocks.take(i) : null;
        if (!inVersion || !inSource) return false;
        const length = Math.min(bs, info.size - i * bs);
        if (length !== Math.min(bs, v.size - i * bs)) return false;
        const expected = cursor.get(i);
        if (!t || t.zeroOnly) return expected === null;
        const { checksum } = await pipeline.digest(t.data);
        return checksum === null ? expected === null : expected !== null && checksum.equals(expected);
      },
      (i, same) => {
        if (same) return;
        const offset = i * bs;
        diffs.push({ block: i, offset, length: Math.min(bs, total - offset) });
      },
    );
    await blocks.finish();
    await proc.done;
  } catch (err) {
    await proc.abandon(err instanceof RbdDiffError);
    throw err;
  }
  return diffs;
}
