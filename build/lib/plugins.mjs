/**
 * esbuild plugins of the single-executable build.
 *
 *  - nativeAddons: routes the way our dependencies find their `.node` files to the run-time loader
 *    build/runtime/native.mjs, and records which addon files must be embedded: lmdb and msgpackr-extract
 *    call `node-gyp-build-optional-packages(dir)` -> replaced by a module that calls
 *    loadNative('<package>'); the file that module would have picked here (same Node, same ABI as the
 *    executable) is the one embedded, unless build-binary.mjs substitutes a build for an older glibc
 *    (`overrides`, see build/compat/). (zstd is node:zlib's since Node 24: no addon.)
 *    Any other `.node` import stops esbuild ("no loader is configured for .node files").
 *  - inkForCommonJs: ink 6 cannot be bundled to CommonJS as published because of top-level `await`
 *    (Node's SEA runs one CommonJS script): yoga-layout awaits the instantiation of its WebAssembly,
 *    and ink's reconciler awaits two development-only imports. See the comments at each patch. It only
 *    acts when ink is part of a bundle (the self-test bundle build/probe/ink-probe.mjs always includes
 *    it, so a patch that stops applying fails every build, also before the UI exists).
 *  - evalSafeModules: packages whose code relies on direct `eval` seeing their module-level variables by
 *    name (ordered-binary, lmdb's key encoder: `eval(makeStringBuilder())` reads and writes `position`).
 *    esbuild renames hoisted ESM top-level variables to avoid collisions across the bundle (msgpackr has a
 *    `position` too), which silently breaks such code: key decoding then loops until V8 aborts with
 *    "invalid size error". Their CommonJS builds are used instead: a CommonJS module is wrapped in a
 *    function, inside which esbuild keeps every name. build-binary.mjs refuses any other direct eval.
 *  - workerSource: the virtual module `blocksafe:worker-source` = { code, natives } of the worker bundle.
 *
 * Every patch goes through replaceExactly(), which throws when the expected text is not found exactly.
 */
import { readFileSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PatchError, replaceExactly } from './patch.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const RUNTIME_NATIVE = path.resolve(HERE, '../runtime/native.mjs');

/** Walks up from `file` to the directory of the package named `name`. */
function packageDirOf(file, name) {
  let dir = path.dirname(file);
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (existsSync(pj)) {
      try {
        if (JSON.parse(readFileSync(pj, 'utf8')).name === name) return dir;
      } catch {
        // not a package.json we can read: keep walking
      }
    }
    const up = path.dirname(dir);
    if (up === dir) throw new PatchError(`cannot find the package directory of ${name} above ${file}`);
    dir = up;
  }
}

/**
 * @param {Map<string, {name: string, source: string}>} addons filled with every addon a bundle loads
 */
export function nativeAddons(addons) {
  return {
    name: 'blocksafe-native-addons',
    setup(build) {
      build.onResolve({ filter: /^node-gyp-build-optional-packages$/ }, (args) => {
        const m = /[\\/]node_modules[\\/]((?:@[^\\/]+[\\/])?[^\\/]+)[\\/]/.exec(args.importer.slice(args.importer.lastIndexOf('node_modules') - 1));
        const pkg = m?.[1].replace(/\\/g, '/');
        if (pkg !== 'lmdb' && pkg !== 'msgpackr-extract') {
          return { errors: [{ text: `unexpected user of node-gyp-build-optional-packages: ${args.importer}; teach build/lib/plugins.mjs (nativeAddons) about its addon` }] };
        }
        const pkgDir = packageDirOf(args.importer, pkg);
        // Ask the real resolver which file it would load in this Node (the one the binary is made from).
        const resolver = createRequire(args.importer)('node-gyp-build-optional-packages');
        let source;
        try {
          source = resolver.resolve(pkgDir);
        } catch (err) {
          return { errors: [{ text: `no native build of ${pkg} for this platform: ${err.message}` }] };
        }
        addons.set(pkg, { name: pkg, source });
        return { path: pkg, namespace: 'blocksafe-native' };
      });
      build.onLoad({ filter: /.*/, namespace: 'blocksafe-native' }, (args) => ({
        // CommonJS, because msgpackr-extract calls it as `require(...)(__dirname)` and lmdb default-imports it.
        contents: `module.exports = function loadNAPI() { return require(${JSON.stringify(RUNTIME_NATIVE)}).loadNative(${JSON.stringify(args.path)}); };\n`,
        loader: 'js',
        resolveDir: HERE,
      }));
    },
  };
}

/**
 * Makes ink 6 (and yoga-layout 3) bundle to CommonJS.
 *
 * yoga-layout's entry is `const Yoga = wrapAssembly(await loadYoga());`. Instead of turning that into a
 * promise every UI entry would have to await, the patched entry instantiates the WebAssembly module
 * synchronously (allowed in Node for any size) through Emscripten's documented `instantiateWasm` hook;
 * with a synchronous instantiation Emscripten finishes initialising before `loadYoga()` returns, which
 * the patch checks (`calledRun`). So ink's own `import Yoga from 'yoga-layout'` keeps working unchanged
 * and UI code needs nothing special. The wasm bytes come from the data: URI in yoga's Emscripten file,
 * which is moved to a virtual module so the bundle holds one copy.
 *
 * ink's reconciler awaits `import('./devtools.js')` and its own package.json, both only when DEV=true:
 * devtools are dropped (their `react-devtools-core` is not installed anyway) and the package.json is
 * inlined at build time.
 */
export function inkForCommonJs(used = new Set()) {
  const DATA_URI = /"data:application\/octet-stream;base64,[A-Za-z0-9+/=]+"/;
  return {
    name: 'blocksafe-ink-cjs',
    setup(build) {
      build.onLoad({ filter: /[\\/]yoga-layout[\\/]dist[\\/]src[\\/]index\.js$/, namespace: 'file' }, (args) => {
        used.add('yoga-layout entry');
        let text = readFileSync(args.path, 'utf8');
        text = replaceExactly(
          text,
          'const Yoga = wrapAssembly(await loadYoga());',
          [
            'import __blocksafeYogaDataUri from "blocksafe:yoga-wasm";',
            '// blocksafe build: synchronous instantiation instead of top-level await (build/lib/plugins.mjs)',
            'const __blocksafeYogaModule = {',
            '  instantiateWasm(imports, receiveInstance) {',
            '    const bytes = Buffer.from(__blocksafeYogaDataUri.slice(__blocksafeYogaDataUri.indexOf(",") + 1), "base64");',
            '    const instance = new WebAssembly.Instance(new WebAssembly.Module(bytes), imports);',
            '    receiveInstance(instance);',
            '    return instance.exports;',
            '  },',
            '};',
            'loadYoga(__blocksafeYogaModule);',
            'if (!__blocksafeYogaModule.calledRun) throw new Error("yoga-layout did not initialise synchronously: the patch in build/lib/plugins.mjs is outdated");',
            'const Yoga = wrapAssembly(__blocksafeYogaModule);',
          ].join('\n'),
          { file: args.path, label: 'yoga-layout synchronous init' },
        );
        return { contents: text, loader: 'js', resolveDir: path.dirname(args.path) };
      });
      build.onLoad({ filter: /[\\/]yoga-layout[\\/]dist[\\/]binaries[\\/]yoga-wasm-base64-esm\.js$/, namespace: 'file' }, (args) => {
        used.add('yoga-layout wasm');
        let text = readFileSync(args.path, 'utf8');
        replaceExactly(text, 'if(h.instantiateWasm)try{return h.instantiateWasm(d,\na)}', '', { file: args.path, label: 'yoga-layout instantiateWasm hook present' });
        text = replaceExactly(text, DATA_URI, '__blocksafeYogaDataUri', { file: args.path, label: 'yoga-layout wasm data URI' });
        text = `import __blocksafeYogaDataUri from "blocksafe:yoga-wasm";\n${text}`;
        return { contents: text, loader: 'js', resolveDir: path.dirname(args.path) };
      });
      build.onResolve({ filter: /^blocksafe:yoga-wasm$/ }, (args) => ({
        path: 'yoga-wasm-data-uri',
        namespace: 'blocksafe-yoga-wasm',
        pluginData: { file: path.resolve(args.importer, '../../binaries/yoga-wasm-base64-esm.js') },
      }));
      build.onLoad({ filter: /.*/, namespace: 'blocksafe-yoga-wasm' }, (args) => {
        const text = readFileSync(args.pluginData.file, 'utf8');
        const found = text.match(new RegExp(DATA_URI.source, 'g')) ?? [];
        if (found.length !== 1) throw new PatchError(`patch "yoga-layout wasm data URI" no longer applies to ${args.pluginData.file}: expected 1 data: URI, found ${found.length}`);
        return { contents: `export default ${found[0]};\n`, loader: 'js' };
      });
      build.onLoad({ filter: /[\\/]ink[\\/]build[\\/]reconciler\.js$/, namespace: 'file' }, (args) => {
        used.add('ink reconciler');
        let text = readFileSync(args.path, 'utf8');
        text = replaceExactly(text, "await import('./devtools.js');", '/* blocksafe build: React DevTools removed (top-level await) */', {
          file: args.path,
          label: 'ink devtools import',
        });
        const pkg = JSON.parse(readFileSync(path.join(packageDirOf(args.path, 'ink'), 'package.json'), 'utf8'));
        text = replaceExactly(text, '? await loadPackageJson()', `? ${JSON.stringify({ name: pkg.name, version: pkg.version })}`, {
          file: args.path,
          label: 'ink package.json await',
        });
        return { contents: text, loader: 'js', resolveDir: path.dirname(args.path) };
      });
    },
  };
}

/** Packages to bundle from their CommonJS build (see the header). */
export const EVAL_SAFE_CJS = ['ordered-binary'];
/** Input files allowed to contain a direct `eval(` (checked by build-binary.mjs). */
export const ALLOWED_DIRECT_EVAL = [/[\\/]node_modules[\\/]ordered-binary[\\/]dist[\\/]index\.cjs$/];

export function evalSafeModules() {
  const filter = new RegExp(`^(${EVAL_SAFE_CJS.map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|')})$`);
  return {
    name: 'blocksafe-eval-safe-modules',
    setup(build) {
      build.onResolve({ filter }, async (args) => {
        if (args.pluginData?.blocksafeEvalSafe) return undefined;
        // Resolve as if required, which selects the package's "require" (CommonJS) export.
        const r = await build.resolve(args.path, { kind: 'require-call', resolveDir: args.resolveDir, importer: args.importer, pluginData: { blocksafeEvalSafe: true } });
        if (r.errors.length) return { errors: r.errors };
        if (!/\.cjs$/.test(r.path)) return { errors: [{ text: `${args.path} no longer resolves to a CommonJS build for require() (got ${r.path}); see evalSafeModules in build/lib/plugins.mjs` }] };
        return { path: r.path };
      });
    },
  };
}

/** The virtual module `blocksafe:worker-source`: `export default { code, natives }`. */
export function workerSource(worker) {
  return {
    name: 'blocksafe-worker-source',
    setup(build) {
      build.onResolve({ filter: /^blocksafe:worker-source$/ }, () => ({ path: 'worker', namespace: 'blocksafe-worker' }));
      build.onLoad({ filter: /.*/, namespace: 'blocksafe-worker' }, () => ({
        contents: `export default ${JSON.stringify({ code: worker.code, natives: worker.natives })};\n`,
        loader: 'js',
      }));
    },
  };
}
