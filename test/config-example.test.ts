/** appliance.conf.example documents every option: it is exactly what `config --example` prints, and it parses. */
import test from 'ava';
import { readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { ROOT, runJson, runOk } from './helpers.js';

test('appliance.conf.example lists every option with its default and is accepted as a config file', async (t) => {
  const file = path.join(ROOT, 'appliance.conf.example');
  const printed = (await runOk(['config', '--example'])).stdout;
  t.is(await readFile(file, 'utf8'), printed, 'regenerate with: node bin/blocksafe.js config --example > appliance.conf.example');
  const withFile = await runJson<{ config: unknown }>(['config', '--config', file]);
  const defaults = await runJson<{ config: unknown }>(['config'], { env: { BLOCKSAFE_CONFIG: undefined } });
  t.deepEqual(withFile.config, defaults.config, 'the example sets every option to its default');
});
