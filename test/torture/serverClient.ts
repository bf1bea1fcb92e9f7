/** The harness side of server.ts: one long-lived CLI process per worker for fault-free commands. */
import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { cliEnv, ROOT, type CliResult } from '../helpers.js';

export class CommandServer {
  private child!: ChildProcess;
  private readonly waiting: ((r: CliResult) => void)[] = [];
  private queue: Promise<unknown> = Promise.resolve();

  /** `mainJs`: the compiled CLI's dist/src/cli/main.js. */
  constructor(private readonly mainJs = path.join(ROOT, 'dist', 'src', 'cli', 'main.js')) {
    this.start();
  }

  private start(): void {
    this.child = spawn(process.execPath, ['--import=tsx', path.join(ROOT, 'test', 'torture', 'server.ts'), this.mainJs], { cwd: ROOT, env: cliEnv(), stdio: ['pipe', 'pipe', 'inherit'] });
    createInterface({ input: this.child.stdout! }).on('line', (line) => {
      const r = JSON.parse(line) as { code: number; stdout: string; stderr: string };
      this.waiting.shift()?.({ code: r.code, signal: null, stdout: r.stdout, stderr: r.stderr });
    });
  }

  /**
   * A new process after a power cut: every process of the machine died with the power, and a lease the
   * rollback brought back must name a dead pid, as it would after a reboot (not this live server's).
   */
  restart(): void {
    this.child.stdin!.end();
    this.start();
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
