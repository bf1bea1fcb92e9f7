import { statSync } from 'node:fs';

/** Environment variables holding secrets: never passed on to child processes (lvm, rbd, …). */
const SECRET_VARIABLES = ['BLOCKSAFE_PASSPHRASE', 'BLOCKSAFE_TO_PASSPHRASE', 'BLOCKSAFE_NEW_PASSPHRASE', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_ACCESS_KEY_ID'];

/** A copy of `env` without the secret variables. */
export function childEnvironment(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const out = { ...env };
  for (const k of SECRET_VARIABLES) delete out[k];
  return out;
}

/**
 * Warnings collected while a command runs and printed when it ends well (an error stays one line, as the
 * CLI contract promises; the warning comes back on the next successful run).
 */
export const deferredWarnings: string[] = [];

/**
 * A warning line when `file` (a passphrase or key file, a configuration holding a secret) can be read by
 * other users than its owner; null when it cannot (or cannot be checked).
 */
export function exposedSecretWarning(file: string, what: string): string | null {
  try {
    const mode = statSync(file).mode & 0o777;
    if ((mode & 0o077) === 0) return null;
    return `blocksafe: warning: ${what} ${file} is readable by other users (mode ${mode.toString(8).padStart(4, '0')}); run "chmod 600 ${file}".\n`;
  } catch {
    return null;
  }
}
