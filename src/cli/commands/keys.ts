import type { Command } from 'commander';
import { UsageError } from '../../errors.js';
import { addSlot, changeSecret, listSlots, removeSlot } from '../../engine/keyslots.js';
import { rekey } from '../../engine/rekey.js';
import { displayLocal } from '../../util/time.js';
import { pipelineSettings, secretSource, withRepository, type GlobalOptions } from '../context.js';
import { printJson } from '../output.js';
import { progressReporter } from '../progressLine.js';

interface KeyOptions extends GlobalOptions {
  newPassphraseFile?: string;
  newKeyFile?: string;
}

export function register(program: Command): void {
  const key = program.command('key').description('key slots: passphrases and key files that open the repository');
  key
    .command('list')
    .description('list the key slots')
    .option('--json', 'print JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      await withRepository(opts, async (repo) => {
        const slots = await listSlots(repo);
        if (opts.json) return printJson(slots.map((s) => ({ id: s.id, type: s.type, created: s.created, kdf: s.kdf.name, in_use: s.id === repo.openedSlot })));
        for (const s of slots) process.stdout.write(`slot ${s.id}: ${s.type} (${s.kdf.name}), created ${displayLocal(new Date(s.created))}${s.id === repo.openedSlot ? ' — opened now' : ''}\n`);
      });
    });
  const newSecretOptions = (c: Command) =>
    c
      .option('--new-passphrase-file <file>', 'the new passphrase (or BLOCKSAFE_NEW_PASSPHRASE, or a prompt)')
      .option('--new-key-file <file>', 'a key file (at least 32 bytes) instead of a new passphrase');
  newSecretOptions(key.command('add').description('add a key slot (a passphrase or a key file)')).action(async (_o: unknown, cmd: Command) => {
    const opts = cmd.optsWithGlobals<KeyOptions>();
    await withRepository(opts, async (repo) => {
      const slot = await addSlot(repo, await secretSource(opts, true, 'new')());
      process.stdout.write(`Added key slot ${slot.id} (${slot.type}).\n`);
    });
  });
  key
    .command('remove')
    .description('remove a key slot (the last one cannot be removed)')
    .argument('<slot>', 'slot number from "key list"')
    .action(async (slot: string, _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      if (!/^\d+$/.test(slot)) throw new UsageError(`"${slot}" is not a slot number; "blocksafe key list" shows them.`);
      await withRepository(opts, async (repo) => {
        await removeSlot(repo, Number(slot));
        process.stdout.write(`Removed key slot ${slot}.\n`);
      });
    });
  newSecretOptions(key.command('passwd').description('change the passphrase (or key file) of the slot you unlock with')).action(async (_o: unknown, cmd: Command) => {
    const opts = cmd.optsWithGlobals<KeyOptions>();
    await withRepository(opts, async (repo) => {
      const slot = await changeSecret(repo, await secretSource(opts, true, 'new')());
      process.stdout.write(`Changed key slot ${slot.id}; the old ${slot.type === 'passphrase' ? 'passphrase' : 'secret'} no longer opens it.\n`);
    });
  });

  program
    .command('rekey')
    .description('rotate the data key: new objects use a new key id, old objects are re-encrypted, old keys retired')
    .option('--master', 'also replace the master key: other key slots are removed (they open only the old one); add them again with "key add"')
    .option('--json', 'print the result as JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions & { master?: boolean }>();
      const progress = progressReporter(!opts.json);
      const s = pipelineSettings(opts);
      const r = await withRepository(opts, (repo) => rekey(repo, { threads: s.threads, queueDepth: s.queueDepth, master: !!opts.master, onProgress: progress.listener }));
      progress.done();
      if (opts.json) return printJson(r);
      process.stdout.write(
        `Data key ${r.key_id}${r.started_new_key ? ' introduced' : ' (rotation continued)'}: re-encrypted ${r.blocks_rewritten} blocks and ${r.metadata_rewritten} metadata objects.` +
          (r.retired_keys.length ? ` Retired key ids ${r.retired_keys.join(', ')}.` : '') +
          (r.kept_because ? ` Old keys kept: ${r.kept_because}.` : '') +
          (r.master_rotated ? ` New master key: your secret now opens slot ${r.new_slot}; removed slots ${r.removed_slots.join(', ')} (add other passphrases again with "key add").` : '') +
          (opts.master && !r.master_rotated ? ' The master key was NOT replaced (the old keys could not be retired yet); run rekey --master again later.' : '') +
          '\n',
      );
    });
}
