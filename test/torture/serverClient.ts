/** The harness side of server.ts: one long-lived CLI process per worker for fault-free commands. */
import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { cliEnv, ROOT, type CliResult } from '../helpers.js';

export class CommandServer {
  private readonly child: ChildProcess;
  private readonly waiting: ((r: CliResult) => void)[] = [];
  private queue: Promise<unknown> = Promise.resolve();

  /** `mainJs`: the compiled CLI's dist/src/cli/main.js. */
  constructor(mainJs = path.join(ROOT, 'dist', 'src', 'cli', 'main.js')) {
    this.child = spawn(process.execPath, ['--import=tsx', path.join(ROOT, 'test', 'torture', 'server.ts'), mainJs], { cwd: ROOT, env: cliEnv(), stdio: ['pipe', 'pipe', 'inherit'] });
    createInterface({ input: this.child.stdout! }).on('line', (line) => {
      const r = JSON.parse(line) as { code: number; stdout: string; stderr: string };
      this.waiting.shift()?.({ code: r.code, signal: null, stdout: r.stdout, stderr: r.stderr });
    });
  }

  run(argv: string[], env: Record<string, string>): Promise<CliResult> {
    const p = this.queue.then(
      () =>
        new Promise<CliResult>((resolve) => {
          this.waiting.push(resolve);
          this.child.stdin!.write(JSON.stringify({ argv, env }) + '\n');
        }),
    );
    this.queue = p.catch(() => undefined);
    return p;
  }

  close(): void {
    this.child.stdin!.end();
  }
}
