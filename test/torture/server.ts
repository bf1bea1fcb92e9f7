/**
 * Runs fault-free CLI commands inside one long-lived process (the torture harness's invariant checks and
 * fault-free steps), saving a Node start-up per command on a loaded machine. Commands with an injected
 * fault, and every power loss, still run in their own process. Protocol: one JSON request a line on stdin
 * ({ argv, env }), one JSON reply a line on stdout ({ code, stdout, stderr }); commands run one at a time.
 * argv[2]: the compiled CLI's main.js (this checkout's or the old code's dist/src/cli/main.js).
 */
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

const { main } = (await import(pathToFileURL(process.argv[2]!).href)) as { main: (argv: string[]) => Promise<number> };
const write = process.stdout.write.bind(process.stdout);
const writeErr = process.stderr.write.bind(process.stderr);
const baseEnv = { ...process.env };

for await (const line of createInterface({ input: process.stdin })) {
  const req = JSON.parse(line) as { argv: string[]; env: Record<string, string> };
  for (const k of Object.keys(process.env)) if (!(k in baseEnv)) delete process.env[k];
  Object.assign(process.env, req.env);
  const out: string[] = [];
  const err: string[] = [];
  const capture = (sink: string[]) =>
    ((chunk: string | Uint8Array) => {
      sink.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
      return true;
    }) as typeof process.stdout.write;
  process.stdout.write = capture(out);
  process.stderr.write = capture(err);
  process.exitCode = undefined;
  let code: number;
  try {
    code = await main(req.argv);
  } catch (e) {
    code = 70;
    err.push(`harness server: ${(e as Error).stack}\n`);
  } finally {
    process.stdout.write = write;
    process.stderr.write = writeErr;
  }
  process.exitCode = undefined;
  write(JSON.stringify({ code, stdout: out.join(''), stderr: err.join('') }) + '\n');
}
