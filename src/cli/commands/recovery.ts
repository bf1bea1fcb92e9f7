import { readFileSync, writeFileSync } from 'node:fs';
import type { Command } from 'commander';
import { describeSystemError, FormatError } from '../../errors.js';
import { rebuildIndex } from '../../engine/rebuild.js';
import { copyVersion, exportVersion, importVersion } from '../../engine/transfer.js';
import { BlockPipeline } from '../../engine/blockPipeline.js';
import { formatBytes } from '../../util/size.js';
import { openOptions, openRepositoryAt, pipelineSettings, secretSource, storeOf, withPipeline, type GlobalOptions } from '../context.js';
import { printJson, versionJson } from '../output.js';
import { progressReporter } from '../progressLine.js';

export function register(program: Command): void {
  const index = program.command('index').description('the local LMDB index');
  index
    .command('rebuild')
    .description('rebuild the index from the blob store alone (manifests, attributes, objects)')
    .option('--json', 'print the result as JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      const { store, indexDir } = storeOf(opts);
      try {
        const r = await rebuildIndex(store, secretSource(opts), indexDir, openOptions(opts));
        if (opts.json) return printJson(r);
        process.stdout.write(`Rebuilt the index: ${r.versions} versions, ${r.blocks} blocks.\n`);
        if (r.missing_blocks) process.stdout.write(`${r.missing_blocks} blocks named by manifests are MISSING from the store; their versions are marked invalid.\n`);
        if (r.damaged_manifests.length) process.stdout.write(`Damaged manifests (versions not recovered): ${r.damaged_manifests.join(', ')}\n`);
        if (r.missing_manifests.length) process.stdout.write(`Versions this machine saw before whose manifests are gone from the store (not recovered): ${r.missing_manifests.join(', ')}\n`);
        if (r.rolled_back.length) process.stdout.write(`Attributes older than ones this machine saw (put back by someone?), now protected: ${r.rolled_back.join(', ')}\n`);
        if (r.not_in_store.length)
          process.stdout.write(
            `WARNING: ${r.not_in_store.length} complete versions of the previous index have no manifest in the store and are gone from the index: ${r.not_in_store.map((v) => `${v.id} (${v.name})`).join(', ')}. If they were not removed on purpose, do not run cleanup: put their manifests back, or keep the previous index.\n`,
          );
        if (r.previous_index) process.stdout.write(`The previous index was kept at ${r.previous_index}.\n`);
      } finally {
        await store.close();
      }
    });

  program
    .command('export')
    .description("write a version's metadata (tags, expiry, protection, block map) as JSON to FILE or - (stdout)")
    .argument('<version>')
    .argument('<file>', 'output file, or - for standard output')
    .action(async (ref: string, file: string, _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      await withPipeline(opts, async (repo) => {
        const text = JSON.stringify(exportVersion(repo, repo.index.resolveVersion(ref))) + '\n';
        if (file === '-') process.stdout.write(text);
        else {
          try {
            writeFileSync(file, text, { flag: 'wx' });
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new FormatError(`${file} exists already; choose another file name.`);
            throw describeSystemError(err, `Export file ${file}`);
          }
        }
      });
    });

  program
    .command('import')
    .description('import version metadata written by export; the repository must hold its blocks')
    .argument('<file>', 'export file, or - for standard input')
    .option('--json', 'print the imported version as JSON')
    .action(async (file: string, _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      let data: unknown;
      try {
        data = JSON.parse(readFileSync(file === '-' ? 0 : file, 'utf8'));
      } catch (err) {
        if (err instanceof SyntaxError) throw new FormatError(`${file === '-' ? 'Standard input' : file} is not valid JSON (${err.message}); was it truncated?`);
        throw describeSystemError(err, `Import file ${file}`);
      }
      const v = await withPipeline(opts, (repo, pipeline) => importVersion(repo, pipeline, data));
      if (opts.json) printJson(versionJson(v));
      else process.stdout.write(`Imported version ${v.id} (${v.name}).\n`);
    });

  program
    .command('copy')
    .description('copy versions with their blocks to another repository (only blocks it lacks are sent; resumable)')
    .argument('<version...>')
    .requiredOption('--to <repo>', 'destination repository (directory or s3://bucket/prefix)')
    .option('--to-passphrase-file <file>', 'passphrase of the destination (or BLOCKSAFE_TO_PASSPHRASE)')
    .option('--to-key-file <file>', 'key file of the destination')
    .option('--json', 'print the result as JSON')
    .action(async (refs: string[], _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<GlobalOptions & { to: string }>();
      const results = await withPipeline(opts, async (src, srcPipe, s) => {
        const versions = refs.map((r) => src.index.resolveVersion(r));
        const dst = await openRepositoryAt(opts, opts.to, secretSource(opts, false, 'destination'));
        let dstPipe: BlockPipeline | undefined;
        try {
          dstPipe = await BlockPipeline.start(dst, pipelineSettings(opts).threads, { storeWrite: s.writeThrottle });
          const out = [];
          for (const v of versions) {
            const progress = progressReporter(!opts.json);
            out.push(await copyVersion(src, srcPipe, dst, dstPipe, v, { queueDepth: s.queueDepth, onProgress: progress.listener }));
            progress.done();
          }
          return out;
        } finally {
          await dstPipe?.close();
          await dst.close();
        }
      });
      if (opts.json) return printJson(results.map((r) => ({ ...r, version: r.version.id })));
      for (const r of results) {
        process.stdout.write(
          r.already_there
            ? `Version ${r.version.id} is already in the destination; nothing was sent.\n`
            : `Copied version ${r.version.id}: sent ${r.blocks_sent} blocks (${formatBytes(r.bytes_sent)}), ${r.blocks_known} were already there.\n`,
        );
      }
    });
}
