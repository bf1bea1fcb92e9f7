import { openSync, readSync, writeSync, closeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { UsageError } from '../errors.js';
import { childEnvironment } from '../util/secrets.js';

/**
 * Reads a line from the controlling terminal without echo. Uses /dev/tty so it works when stdin is a pipe
 * and fails clearly when there is no terminal (cron, CI): then BLOCKSAFE_PASSPHRASE or --passphrase-file.
 */
export function promptHidden(question: string, alternatives = 'set BLOCKSAFE_PASSPHRASE, or use --passphrase-file or --key-file'): string {
  let fd: number;
  try {
    fd = openSync('/dev/tty', 'r+');
  } catch {
    throw new UsageError(`A passphrase is needed but there is no terminal to ask on; ${alternatives}.`);
  }
  const stty = (arg: string) => spawnSync('stty', [arg], { stdio: [fd, 'ignore', 'ignore'], env: childEnvironment() });
  try {
    writeSync(fd, question);
    stty('-echo');
    const buf = Buffer.alloc(1);
    const bytes: number[] = [];
    for (;;) {
      const n = readSync(fd, buf, 0, 1, null);
      if (n === 0 || buf[0] === 0x0a || buf[0] === 0x0d) break;
      if (buf[0] === 0x03) throw new UsageError('Interrupted.');
      if (buf[0] === 0x7f || buf[0] === 0x08) bytes.pop();
      else bytes.push(buf[0]!);
    }
    writeSync(fd, '\n');
    return Buffer.from(bytes).toString('utf8');
  } finally {
    stty('echo');
    closeSync(fd);
  }
}

/** Asks a yes/no question on the terminal (default yes). False when there is no interactive terminal. */
export function askYesNo(question: string): boolean {
  if (!process.stdin.isTTY || !process.stderr.isTTY) return false;
  let fd: number;
  try {
    fd = openSync('/dev/tty', 'r+');
  } catch {
    return false;
  }
  try {
    writeSync(fd, `${question} [Y/n] `);
    const buf = Buffer.alloc(256);
    const n = readSync(fd, buf, 0, buf.length, null);
    const answer = buf.subarray(0, n).toString('utf8').trim().toLowerCase();
    return answer === '' || answer === 'y' || answer === 'yes';
  } finally {
    closeSync(fd);
  }
}
