/**
 * Build-time self-test of the ink/yoga patches (build/lib/plugins.mjs, inkForCommonJs): bundled to
 * CommonJS exactly like the executable and run with plain node by build/build-binary.mjs. It lays out a
 * bordered, padded box (yoga at work) both with renderToString and with render() to a fake terminal, and
 * prints a marker the build checks. Runs on every build, so a patch that stops applying after an ink or
 * yoga upgrade fails the build even while no command of the CLI imports ink.
 */
import { PassThrough } from 'node:stream';
import React from 'react';
import { Box, render, renderToString, Text } from 'ink';

const h = React.createElement;
const ui = h(Box, { borderStyle: 'round', paddingX: 2, width: 30 }, h(Text, null, 'ink probe'), h(Box, { flexGrow: 1 }), h(Text, null, 'ok'));

const text = renderToString(ui, { columns: 40 });
const lines = text.split('\n');
if (lines.length !== 3 || !lines[0].startsWith('╭') || lines[0].length !== 30 || !/│ {2}ink probe {10,}ok {2}│/.test(lines[1])) {
  process.stderr.write(`ink probe: unexpected layout from renderToString:\n${text}\n`);
  process.exit(1);
}

const stdout = new PassThrough();
stdout.columns = 40;
stdout.rows = 10;
let written = '';
stdout.on('data', (chunk) => {
  written += chunk.toString();
});
const stdin = new PassThrough();
stdin.isTTY = false;
const instance = render(ui, { stdout, stdin, stderr: new PassThrough(), patchConsole: false, exitOnCtrlC: false, debug: true });
instance.unmount();
// No top-level await here: this file is bundled to CommonJS too.
instance.waitUntilExit().then(() => {
  if (!written.includes('ink probe') || !written.includes('╰')) {
    process.stderr.write(`ink probe: render() wrote nothing sensible:\n${written}\n`);
    process.exit(1);
  }
  process.stdout.write('ink-probe-ok\n');
});
