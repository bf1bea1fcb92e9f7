import type { Progress, ProgressListener } from '../engine/progress.js';
import { formatBytes } from '../util/size.js';
import { formatDuration } from '../util/time.js';

/**
 * On a terminal: one self-overwriting line with bytes, throughput and ETA, at most 5 times a second.
 * Otherwise (logs, cron): a plain line per 10 %, at most every 5 s. Quiet in --json mode.
 */
export function progressReporter(enabled: boolean, stream: NodeJS.WriteStream = process.stderr): { listener: ProgressListener; done: () => void } {
  if (!enabled) return { listener: () => undefined, done: () => undefined };
  const start = Date.now();
  let lastPaint = start;
  let lastDecile = -1;
  let painted = false;
  const line = (p: Progress) => {
    const elapsed = (Date.now() - start) / 1000;
    const rate = elapsed > 0 ? p.doneBytes / elapsed : 0;
    const pct = p.totalBytes > 0 ? (100 * p.doneBytes) / p.totalBytes : 100;
    const eta = rate > 0 ? formatDuration(((p.totalBytes - p.doneBytes) / rate) * 1000) : '?';
    const dmg = p.damaged ? `, ${p.damaged} damaged` : '';
    return `${p.phase}: ${pct.toFixed(1)} % ${formatBytes(p.doneBytes)} of ${formatBytes(p.totalBytes)}, ${formatBytes(rate)}/s, ETA ${eta}${dmg}`;
  };
  const listener = (p: Progress) => {
    if (stream.isTTY) {
      const now = Date.now();
      if (now - lastPaint < 200 && p.doneBytes < p.totalBytes) return;
      lastPaint = now;
      stream.write(`\r\x1b[K${line(p)}`);
      painted = true;
    } else {
      // Logs get a line per 10 %, at most one every 5 s; the command's summary line ends the story.
      const decile = p.totalBytes > 0 ? Math.floor((10 * p.doneBytes) / p.totalBytes) : 10;
      const now = Date.now();
      if (decile > lastDecile && decile < 10 && now - lastPaint >= 5000) {
        lastDecile = decile;
        lastPaint = now;
        stream.write(line(p) + '\n');
      }
    }
  };
  return { listener, done: () => painted && stream.write('\n') };
}
