/**
 * The one error hierarchy of blocksafe. Every error a user can cause or meet carries the exit code the
 * CLI contract assigns to it and a message that is one sentence naming what is wrong and what to do.
 */
export const ExitCode = {
  ok: 0,
  failure: 1,
  usage: 2,
  integrity: 3,
  locked: 4,
} as const;
export type ExitCodeValue = (typeof ExitCode)[keyof typeof ExitCode];

export class BlocksafeError extends Error {
  readonly exitCode: ExitCodeValue;
  constructor(message: string, exitCode: ExitCodeValue = ExitCode.failure, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.exitCode = exitCode;
  }
}

/** Bad command line, bad config file, bad argument value. */
export class UsageError extends BlocksafeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, ExitCode.usage, options);
  }
}

/** A named thing (version, repository, source) does not exist. */
export class NotFoundError extends BlocksafeError {}

/** The operation would destroy data and was refused (existing target, mounted device, …). */
export class RefusedError extends BlocksafeError {}

/** A long operation was stopped on request (a signal, the UI's Stop); its progress is kept for a resume. */
export class StoppedError extends BlocksafeError {}

/** Wrong passphrase or key file. */
export class KeyError extends BlocksafeError {}

/** Stored data failed authentication or verification. */
export class IntegrityError extends BlocksafeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, ExitCode.integrity, options);
  }
}

/** Another process holds a lock we need. */
export class LockedError extends BlocksafeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, ExitCode.locked, options);
  }
}

/** The repository or index is in a format this binary cannot handle. */
export class FormatError extends BlocksafeError {}

/** Turns a Node.js system error into one readable sentence about `what`. */
export function describeSystemError(err: unknown, what: string): BlocksafeError {
  if (err instanceof BlocksafeError) return err;
  const e = err as NodeJS.ErrnoException;
  switch (e?.code) {
    case 'ENOENT':
      return new NotFoundError(`${what} does not exist.`, ExitCode.failure, { cause: err });
    case 'EACCES':
    case 'EPERM':
      return new BlocksafeError(`${what} is not accessible: permission denied (run as a user that may read/write it).`, ExitCode.failure, { cause: err });
    case 'ENOSPC':
      return new BlocksafeError(`${what}: no space left on the device; free some space and retry (the repository is unchanged up to the last completed step).`, ExitCode.failure, { cause: err });
    case 'EISDIR':
      return new BlocksafeError(`${what} is a directory, not a file or block device.`, ExitCode.failure, { cause: err });
    case 'EROFS':
      return new BlocksafeError(`${what}: the filesystem is read-only (mount it read-write to change it).`, ExitCode.failure, { cause: err });
    case 'EIO':
      return new BlocksafeError(`${what}: input/output error from the device.`, ExitCode.failure, { cause: err });
    default:
      return new BlocksafeError(`${what}: ${e?.message ?? String(err)}`, ExitCode.failure, { cause: err });
  }
}
