#!/usr/bin/env node
// Entry of `npx blocksafe` in a checkout: runs the compiled CLI (npm run build first).
import('../dist/src/cli/run.js').catch((err) => {
  if (err && err.code === 'ERR_MODULE_NOT_FOUND') {
    process.stderr.write('blocksafe: not built yet; run "npm run build" first.\n');
    process.exit(1);
  }
  throw err;
});
