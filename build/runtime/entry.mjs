/**
 * Entry of the single executable (bundled to one CommonJS file by build/build-binary.mjs). It replaces
 * src/cli/run.ts, whose top-level `await` CommonJS output cannot express, and does what run.ts does:
 * `process.exitCode = await main(argv)`.
 *
 * Before the CLI loads it installs `globalThis.__blocksafeWorkerSource`, which src/engine/workerPool.ts
 * uses instead of a worker file: the bundled worker script (build/out/worker.cjs, inlined here as a
 * string) prefixed with the paths of the native addons this process extracted, so that worker threads
 * load exactly the same verified files (see native.mjs). It is a getter, so the addons are only
 * resolved when the first worker starts.
 *
 * The CLI is loaded through a dynamic import, which esbuild turns into a lazy `require` inside the same
 * file: so an addon that cannot be loaded while the CLI's modules initialise (lmdb loads its addon at
 * import time) is reported as one line by the catch below instead of a stack trace.
 */
import workerBundle from 'blocksafe:worker-source';
import { VERSION } from '../../src/version.ts';
import { nativePaths } from './native.mjs';

let workerSource;
Object.defineProperty(globalThis, '__blocksafeWorkerSource', {
  configurable: true,
  enumerable: false,
  get() {
    if (workerSource === undefined) {
      const prelude = `globalThis.__blocksafeNativePaths = ${JSON.stringify(nativePaths(workerBundle.natives))};\n`;
      workerSource = prelude + workerBundle.code;
    }
    return workerSource;
  },
});

const argv = process.argv.slice(2);

if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
  // As src/cli/run.ts: the version needs neither the argument parser nor any command module.
  process.stdout.write(`${VERSION}\n`);
} else {
  start();
}

function start() {
  import('../../src/cli/main.ts')
    .then(({ main }) => main(argv))
    .then(
      (code) => {
        process.exitCode = code;
      },
      (err) => {
        if (err?.blocksafeNative) process.stderr.write(`blocksafe: ${err.message}\n`);
        else process.stderr.write(`blocksafe: unexpected error while starting: ${err?.message ?? String(err)} (run with --debug for details; please report it)\n`);
        if (argv.includes('--debug')) process.stderr.write(`${err?.stack ?? err}\n`);
        process.exitCode = 1;
      },
    );
}
