/**
 * The main script of the single executable (what the SEA runs first). It is tiny on purpose: `--version`
 * is answered here, before the 3 MB application script is even read (start-up time, issue 19: a SEA whose
 * main script is the whole bundle spends about 25 ms deserialising it). Everything else loads the bundle
 * (build/out/blocksafe.cjs, embedded as the asset "app.cjs") with node:vm and the V8 code cache that
 * build/build-binary.mjs made for it with this same Node binary ("app.cache"), and runs it as a CommonJS
 * module with the SEA's `require` (built-in modules only, as before).
 *
 * __VERSION__ is replaced by the build with package.json's version.
 */
'use strict';
const argv = process.argv.slice(2);
if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
  process.stdout.write(`${__VERSION__}\n`);
} else {
  const sea = require('node:sea');
  const vm = require('node:vm');
  const code = sea.getAsset('app.cjs', 'utf8');
  let cachedData;
  try {
    cachedData = new Uint8Array(sea.getAsset('app.cache'));
  } catch {
    cachedData = undefined; // built with --no-code-cache
  }
  const script = new vm.Script(`(function (exports, require, module, __filename, __dirname) {${code}\n})`, {
    filename: 'blocksafe.cjs',
    cachedData,
    importModuleDynamically: vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER,
  });
  if (cachedData && script.cachedDataRejected && argv.includes('--debug')) {
    process.stderr.write('blocksafe: note: the embedded code cache was rejected by this Node (start-up is slower)\n');
  }
  const app = { exports: {} };
  script.runInThisContext()(app.exports, require, app, process.execPath, require('node:path').dirname(process.execPath));
}
