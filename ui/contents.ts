/**
 * What is on a restore target before it is overwritten, in words: a filesystem with its label, a partition
 * table, or "all zeros as far as checked". blkid (util-linux, on every rescue system) probes the signature;
 * without blkid, or when it finds nothing, the first and last MiB are read.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs/promises';

function blkid(target: string): Promise<Record<string, string> | null> {
  return new Promise((resolve) => {
    // -p: probe the device itself (no cache); exit 2 = nothing found.
    execFile('blkid', ['-p', '-o', 'export', target], { timeout: 10_000 }, (err, stdout) => {
      if (err) return resolve(null);
      const out: Record<string, string> = {};
      for (const line of stdout.split('\n')) {
        const eq = line.indexOf('=');
        if (eq > 0) out[line.slice(0, eq)] = line.slice(eq + 1);
      }
      resolve(out);
    });
  });
}

async function zerosAtEnds(target: string, size: number): Promise<boolean | null> {
  let fh: fs.FileHandle | undefined;
  try {
    fh = await fs.open(target, 'r');
    const probe = Math.min(size, 2 ** 20);
    const buf = Buffer.alloc(probe);
    for (const pos of [0, Math.max(0, size - probe)]) {
      const { bytesRead } = await fh.read(buf, 0, probe, pos);
      if (buf.subarray(0, bytesRead).some((b) => b !== 0)) return false;
    }
    return true;
  } catch {
    return null;
  } finally {
    await fh?.close();
  }
}

/** "an ext4 filesystem labelled "root"", "a gpt partition table", "all zeros as far as checked", or null. */
export async function describeContents(target: string, size: number): Promise<string | null> {
  const found = await blkid(target);
  if (found?.TYPE) {
    const label = found.LABEL ? ` labelled "${found.LABEL}"` : '';
    return found.USAGE === 'filesystem' || !found.USAGE ? `a ${found.TYPE} filesystem${label}` : `${found.TYPE} (${found.USAGE})${label}`;
  }
  if (found?.PTTYPE) return `a ${found.PTTYPE} partition table`;
  const zeros = await zerosAtEnds(target, size);
  if (zeros === true) return 'all zeros as far as checked (first and last MiB)';
  if (zeros === false) return 'data of an unknown kind (no filesystem or partition table recognised)';
  return null;
}
