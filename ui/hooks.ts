/** Hooks shared by the screens: terminal size, throttled progress, the session context. */
import { useInput, useStdout, type Key } from 'ink';
import { createContext, useCallback, useContext, useEffect, useRef, useState } from 'react';
import type { Backend, Progress } from './backend.js';

export interface TerminalSize {
  columns: number;
  rows: number;
}

/** The terminal size, updated on resize (80×24 when the output is not a terminal). */
export function useTerminalSize(): TerminalSize {
  const { stdout } = useStdout();
  const read = useCallback((): TerminalSize => ({ columns: stdout.columns || 80, rows: stdout.rows || 24 }), [stdout]);
  const [size, setSize] = useState(read);
  useEffect(() => {
    const onResize = () => setSize(read());
    stdout.on('resize', onResize);
    return () => {
      stdout.off('resize', onResize);
    };
  }, [stdout, read]);
  return size;
}

/** A long operation the user can stop (ctrl-c, Esc, a terminal hang-up). */
export interface Job {
  /** Ask it to stop after the blocks in flight. */
  stop(): void;
}

export interface Session {
  backend: Backend;
  size: TerminalSize;
  /** False while the help screen covers the current screen: its keys are off then. */
  active: boolean;
  quit(): void;
  openHelp(): void;
  /** Registers the running operation (null when it ended), for ctrl-c and quitting. */
  setJob(job: Job | null): void;
  /** A line for the terminal after the UI has closed (what was done). */
  log(line: string): void;
  /** Damage was found (restore or scrub): the UI exits with code 3. */
  noteIntegrityProblem(): void;
}

export const SessionContext = createContext<Session | null>(null);

export function useSession(): Session {
  const s = useContext(SessionContext);
  if (!s) throw new Error('useSession outside of the blocksafe UI');
  return s;
}

export interface ProgressView {
  progress: Progress | null;
  /** Bytes per second over this run. */
  rate: number;
  /** Milliseconds left, or null while unknown. */
  etaMs: number | null;
  elapsedMs: number;
}

/**
 * Progress of a running operation, painted at most 4 times a second whatever the rate of events.
 * Throughput counts from the first event of this run, so a resumed restore does not look impossibly fast.
 */
export function useProgress(): { view: ProgressView; listener: (p: Progress) => void; reset: () => void } {
  const latest = useRef<Progress | null>(null);
  const first = useRef<{ t: number; bytes: number } | null>(null);
  const started = useRef(Date.now());
  const [view, setView] = useState<ProgressView>({ progress: null, rate: 0, etaMs: null, elapsedMs: 0 });
  const compute = useCallback((): ProgressView => {
    const p = latest.current;
    const now = Date.now();
    const elapsedMs = now - started.current;
    if (!p || !first.current) return { progress: p, rate: 0, etaMs: null, elapsedMs };
    const dt = (now - first.current.t) / 1000;
    const rate = dt > 0.2 ? (p.doneBytes - first.current.bytes) / dt : 0;
    const etaMs = rate > 0 ? ((p.totalBytes - p.doneBytes) / rate) * 1000 : null;
    return { progress: { ...p }, rate, etaMs, elapsedMs };
  }, []);
  useEffect(() => {
    const timer = setInterval(() => setView(compute()), 250);
    return () => clearInterval(timer);
  }, [compute]);
  const listener = useCallback((p: Progress) => {
    if (!first.current) first.current = { t: Date.now(), bytes: p.doneBytes };
    latest.current = p;
  }, []);
  const reset = useCallback(() => {
    latest.current = null;
    first.current = null;
    started.current = Date.now();
    setView({ progress: null, rate: 0, etaMs: null, elapsedMs: 0 });
  }, []);
  return { view, listener, reset };
}

const NO_KEY: Key = {
  upArrow: false,
  downArrow: false,
  leftArrow: false,
  rightArrow: false,
  pageDown: false,
  pageUp: false,
  home: false,
  end: false,
  return: false,
  escape: false,
  ctrl: false,
  shift: false,
  tab: false,
  backspace: false,
  delete: false,
  meta: false,
  super: false,
  hyper: false,
  capsLock: false,
  numLock: false,
};

/** The key a single control character stands for. */
function controlKey(c: string): [string, Key] {
  if (c === '\r' || c === '\n') return ['', { ...NO_KEY, return: true }];
  if (c === '\t') return ['', { ...NO_KEY, tab: true }];
  if (c === '\x7f' || c === '\b') return ['', { ...NO_KEY, backspace: true }];
  const code = c.charCodeAt(0);
  if (code >= 1 && code <= 26) return [String.fromCharCode(code + 96), { ...NO_KEY, ctrl: true }];
  return ['', { ...NO_KEY }];
}

/**
 * useInput, one key at a time. Ink hands over a run of plain characters as one event, Enter included
 * ("sdb\r" when typed fast, over a slow link, or pasted): that is split here into text and single keys, so an
 * Enter is never lost inside a word. Enter also arrives as "\n" from some terminals.
 */
export function useKeys(handler: (input: string, key: Key) => void, options: { isActive?: boolean } = {}): void {
  useInput((input, key) => {
    if (key.ctrl || key.meta || input.length === 0 || !/[\u0000-\u001f\u007f]/.test(input)) return handler(input, key);
    if (input.length === 1) {
      const [i, k] = controlKey(input);
      return handler(i, { ...k, shift: key.shift });
    }
    for (const part of input.match(/[^\u0000-\u001f\u007f]+|[\u0000-\u001f\u007f]/g) ?? []) {
      if (/^[\u0000-\u001f\u007f]$/.test(part)) {
        const [i, k] = controlKey(part);
        handler(i, k);
      } else handler(part, { ...NO_KEY });
    }
  }, options);
}
