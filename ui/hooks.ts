/** Hooks shared by the screens: terminal size, throttled progress, the session context. */
import { useInput, useStdin, useStdout, type Key as InkKey } from 'ink';
import { createContext, useCallback, useContext, useEffect, useLayoutEffect, useRef, useState } from 'react';
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
  /** A restore to `target` was left stopped or failed (true), or has finished since (false): exit code 1. */
  noteUnfinished(target: string, unfinished: boolean): void;
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
export function useProgress(): { view: ProgressView; listener: (p: Progress) => void; reset: () => void; snapshot: () => ProgressView } {
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
  const listener = useCallback(
    (p: Progress) => {
      const isFirst = !first.current;
      if (isFirst) first.current = { t: Date.now(), bytes: p.doneBytes };
      latest.current = p;
      // The first figure (0 %, or where a resume starts) is shown at once, not at the next tick.
      if (isFirst) setView(compute());
    },
    [compute],
  );
  const reset = useCallback(() => {
    latest.current = null;
    first.current = null;
    started.current = Date.now();
    setView({ progress: null, rate: 0, etaMs: null, elapsedMs: 0 });
  }, []);
  return { view, listener, reset, snapshot: compute };
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

/** Ink's key, plus the function keys people know from htop and mc (F1 help, F10 quit). */
export interface Key extends InkKey {
  f1?: boolean;
  f10?: boolean;
}

type KeyListener = (input: string, key: Key) => void;

/** Ink reports function keys with an empty input and no flag: they are recognised from the raw sequence. */
const FUNCTION_KEYS: Record<string, Partial<Key>> = {
  '\x1bOP': { f1: true },
  '\x1b[11~': { f1: true },
  '\x1b[[A': { f1: true },
  '\x1b[21~': { f10: true },
};

/**
 * Routes keys from the one Ink input subscription to the components listening right now, one key at a time.
 * React renders a state change asynchronously (a scheduler task), so handlers called back to back would see
 * the state from before the first key: after each key the bus lets the scheduler run (two setImmediate hops;
 * React's scheduler uses setImmediate in Node) before delivering the next one.
 */
export class KeyBus {
  private readonly listeners = new Set<KeyListener>();
  private readonly queue: [string, Key][] = [];
  private draining = false;
  add(l: KeyListener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }
  push(input: string, key: Key): void {
    this.queue.push([input, key]);
    if (!this.draining) this.drain();
  }
  private drain(): void {
    const next = this.queue.shift();
    if (!next) {
      this.draining = false;
      return;
    }
    this.draining = true;
    for (const l of [...this.listeners]) l(next[0], next[1]);
    setImmediate(() => setImmediate(() => this.drain()));
  }
}

export const KeyBusContext = createContext<KeyBus | null>(null);

/**
 * The one subscription to Ink's input, at the root. Ink subscribes useInput handlers in effects, which run
 * after the new screen is already painted: a key pressed in between would be lost. useKeys subscribes to this
 * bus during the commit instead, so a screen listens from the moment it is visible.
 */
export function useKeyRoot(): KeyBus {
  const bus = useRef<KeyBus | null>(null);
  bus.current ??= new KeyBus();
  const b = bus.current;
  useInput(useCallback((input: string, key: InkKey) => dispatchKeys(input, key, (i, k) => b.push(i, k)), [b]));
  const { internal_eventEmitter: raw } = useStdin();
  useEffect(() => {
    const onRaw = (data: string) => {
      const fn = FUNCTION_KEYS[data];
      if (fn) b.push('', { ...NO_KEY, ...fn });
    };
    raw?.on('input', onRaw);
    return () => {
      raw?.off('input', onRaw);
    };
  }, [raw, b]);
  return b;
}

/**
 * Keys for a component, one at a time. Ink hands over a run of plain characters as one event, Enter
 * included ("sdb\r" when typed fast, over a slow link, or pasted): that is split into text and single keys,
 * so an Enter is never lost inside a word. Enter also arrives as "\n" from some terminals. The newest handler
 * (with the newest state) is always the one called.
 */
export function useKeys(handler: (input: string, key: Key) => void, options: { isActive?: boolean } = {}): void {
  const bus = useContext(KeyBusContext);
  const latest = useRef(handler);
  latest.current = handler;
  const active = options.isActive !== false;
  useLayoutEffect(() => {
    if (!active || !bus) return;
    return bus.add((i, k) => latest.current(i, k));
  }, [bus, active]);
}

function dispatchKeys(input: string, key: Key, handler: (input: string, key: Key) => void): void {
  // Esc and the next key in one read (a slow SSH link) arrive as "meta + key": that is Esc, then the key.
  const nav = key.upArrow || key.downArrow || key.leftArrow || key.rightArrow || key.pageUp || key.pageDown || key.home || key.end || key.return || key.tab || key.backspace || key.delete;
  if (key.meta && !key.escape && !key.ctrl && !nav && input.length > 0) {
    handler('', { ...NO_KEY, escape: true, meta: true });
    return dispatchKeys(input, { ...NO_KEY, shift: key.shift }, handler);
  }
  {
    // Several plain keys in one read ("kk", "/abc" typed fast or over a slow link) are several keys: each is
    // handled on its own, so a "/" that opens the filter is not swallowed with the text after it.
    if (!key.ctrl && !key.meta && input.length > 1 && !/[\u0000-\u001f\u007f]/.test(input)) {
      for (const c of Array.from(input)) handler(c, { ...key, shift: /[A-Z]/.test(c) });
      return;
    }
    if (key.ctrl || key.meta || input.length === 0 || !/[\u0000-\u001f\u007f]/.test(input)) return handler(input, key);
    if (input.length === 1) {
      const [i, k] = controlKey(input);
      return handler(i, { ...k, shift: key.shift });
    }
    for (const part of input.match(/[^\u0000-\u001f\u007f]+|[\u0000-\u001f\u007f]/g) ?? []) {
      if (/^[\u0000-\u001f\u007f]$/.test(part)) {
        const [i, k] = controlKey(part);
        handler(i, k);
      } else for (const c of Array.from(part)) handler(c, { ...NO_KEY, shift: /[A-Z]/.test(c) });
    }
  }
}
