/**
 * The blocksafe terminal UI: `blocksafe ui --repo …`, the 3 a.m. interface. App is the screen machine
 * (unlock → versions → restore / scrub / remove / mount, help on top); runUi starts it on the terminal's alternate
 * screen and puts the terminal back however it ends.
 */
import { EventEmitter } from 'node:events';
import { Box, Text, render, useApp } from 'ink';
import { Component, useCallback, useEffect, useMemo, useRef, useState, type ReactNode } from 'react';
import type { GlobalOptions } from '../src/engine/session.js';
import { errorText, type Backend, type Connect, type VersionRecord } from './backend.js';
import { Frame, TextInput } from './components.js';
import { HelpScreen } from './HelpScreen.js';
import { MountScreen } from './MountScreen.js';
import { KeyBusContext, SessionContext, useKeyRoot, useKeys, useTerminalSize, type Job, type Session } from './hooks.js';
import { RemoveScreen } from './RemoveScreen.js';
import { RestoreWizard } from './RestoreWizard.js';
import { ScrubScreen } from './ScrubScreen.js';
import { TagScreen } from './TagScreen.js';
import { VersionsScreen, type ListAction } from './VersionList.js';

type Screen =
  | { kind: 'list'; notice: string | null; selected: string | null }
  | { kind: 'restore'; version: VersionRecord }
  | { kind: 'scrub'; version: VersionRecord | null }
  | { kind: 'remove'; version: VersionRecord }
  | { kind: 'tags'; version: VersionRecord }
  | { kind: 'mount'; version: VersionRecord };

export interface AppProps {
  /** Opens the repository (asking for a passphrase through the callback when one is needed). */
  connect: Connect;
  location: string;
  /** Another repository path typed after this one did not open (a typo at 3 a.m.); throws on a bad one. */
  relocate?: (input: string) => { location: string; connect: Connect };
  /** Called once the app has decided to end (after any running operation stopped). */
  onLog?: (line: string) => void;
  onIntegrityProblem?: () => void;
  /** A restore was left stopped or failed (true), or finished since (false); the repository did not open (fatal). */
  onUnfinished?: (target: string, unfinished: boolean) => void;
  onFatal?: (fatal: boolean) => void;
  /** 'quit' events (SIGTERM, SIGHUP) stop a running operation and end the app. */
  events?: EventEmitter;
}

/** Catches a rendering bug and shows one error line instead of Ink's stack trace. */
class Guard extends Component<{ children: ReactNode; onError: (e: unknown) => void }, { error: string | null }> {
  override state = { error: null as string | null };
  static getDerivedStateFromError(e: unknown) {
    return { error: errorText(e) };
  }
  override componentDidCatch(e: unknown) {
    this.props.onError(e);
  }
  override render() {
    if (this.state.error) {
      return (
        <Box flexDirection="column">
          <Text color="red" bold>
            Error: {this.state.error}
          </Text>
          <Text>Nothing more can be done in this window; press q or ctrl-c to quit. Running restores were stopped safely.</Text>
        </Box>
      );
    }
    return this.props.children;
  }
}

type Gate = { kind: 'opening' } | { kind: 'passphrase'; error: string | null; unlocking: boolean } | { kind: 'fatal'; error: string; retyping: boolean } | { kind: 'ready'; backend: Backend };

function UnlockScreen({ location, error, unlocking, onSubmit }: { location: string; error: string | null; unlocking: boolean; onSubmit: (p: string) => void }) {
  const [pass, setPass] = useState('');
  return (
    <Frame
      title={`blocksafe · ${location}`}
      keys={[
        ['Enter', 'unlock'],
        ['Esc', 'quit'],
      ]}
      error={error}
    >
      <Box flexDirection="column">
        <Text bold>This repository is encrypted.</Text>
        <Text>Type its passphrase and press Enter (what you type is shown as stars).</Text>
        <Text> </Text>
        <Text>
          Passphrase:{' '}
          <TextInput
            value={pass}
            mask
            active={!unlocking}
            onChange={setPass}
            onSubmit={(value) => {
              onSubmit(value);
              setPass('');
            }}
          />
        </Text>
        {unlocking ? <Text color="cyan">Unlocking…</Text> : null}
      </Box>
    </Frame>
  );
}

function Message({ location, text, error, retype }: { location: string; text?: string; error?: string; retype?: boolean }) {
  return (
    <Frame
      title={`blocksafe · ${location}`}
      keys={
        retype && error
          ? [
              ['r', 'another path'],
              ['q', 'quit'],
            ]
          : [['q', 'quit']]
      }
      error={error}
    >
      <Text wrap="wrap">{text ?? (error ? `The repository could not be opened (the reason is below). ${retype ? 'Press r to type another path, or q to quit.' : 'Press q to quit.'}` : '')}</Text>
    </Frame>
  );
}

/** The app with its key routing (see useKeyRoot). */
export function App(props: AppProps) {
  const bus = useKeyRoot();
  return (
    <KeyBusContext.Provider value={bus}>
      <Screens {...props} />
    </KeyBusContext.Provider>
  );
}

function Screens({ connect: firstConnect, location: firstLocation, relocate, onLog, onIntegrityProblem, onUnfinished, onFatal, events }: AppProps) {
  const [repoTarget, setRepoTarget] = useState({ location: firstLocation, connect: firstConnect });
  const { location, connect } = repoTarget;
  const [newPath, setNewPath] = useState('');
  const { exit } = useApp();
  const size = useTerminalSize();
  const [gate, setGate] = useState<Gate>({ kind: 'opening' });
  const [screen, setScreen] = useState<Screen>({ kind: 'list', notice: null, selected: null });
  const [help, setHelp] = useState(false);
  const job = useRef<Job | null>(null);
  const quitting = useRef(false);
  const passphraseWaiter = useRef<((p: string) => void) | null>(null);
  const [crashed, setCrashed] = useState(false);

  // Open the repository; a wrong passphrase asks again.
  useEffect(() => {
    let alive = true;
    const attempt = (previousError: string | null) => {
      let asked = false;
      const ask = () =>
        new Promise<string>((resolve) => {
          asked = true;
          passphraseWaiter.current = (p) => {
            passphraseWaiter.current = null;
            setGate({ kind: 'passphrase', error: null, unlocking: true });
            // Let the "Unlocking…" frame reach the screen before the key derivation occupies the CPU.
            setTimeout(() => resolve(p), 60);
          };
          setGate({ kind: 'passphrase', error: previousError, unlocking: false });
          previousError = null;
        });
      connect(ask).then(
        (backend) => {
          if (!alive) return void backend.close();
          onFatal?.(false);
          setGate({ kind: 'ready', backend });
        },
        (err) => {
          if (!alive) return;
          if (asked) attempt(errorText(err));
          else {
            onFatal?.(true);
            setGate({ kind: 'fatal', error: errorText(err), retyping: false });
          }
        },
      );
    };
    attempt(null);
    return () => {
      alive = false;
    };
  }, [connect]);

  const finish = useCallback(() => {
    if (quitting.current) return;
    quitting.current = true;
    exit();
  }, [exit]);

  const pendingQuit = useRef(false);
  const quit = useCallback(() => {
    if (job.current) {
      // Never leave in the middle of a write: stop first, quit when the operation has ended.
      quitting.current = false;
      pendingQuit.current = true;
      job.current.stop();
      return;
    }
    finish();
  }, [finish]);

  const setJob = useCallback(
    (j: Job | null) => {
      job.current = j;
      if (!j && pendingQuit.current) finish();
    },
    [finish],
  );

  useEffect(() => {
    if (!events) return;
    const onQuit = () => quit();
    events.on('quit', onQuit);
    return () => {
      events.off('quit', onQuit);
    };
  }, [events, quit]);

  const tooSmall = size.columns < MIN_COLUMNS || size.rows < MIN_ROWS;
  // ctrl-c: stop a running operation, else quit. F10 quits (stopping first), F1 opens the help. Always
  // listening, whatever the screen.
  useKeys((input, key) => {
    if (key.ctrl && input === 'c') {
      if (job.current) return job.current.stop();
      return finish();
    }
    if (key.f10) return quit();
    if (key.f1 && gate.kind === 'ready' && !tooSmall) return setHelp(true);
    if (tooSmall && input === 'q') return quit();
    if (gate.kind === 'fatal' && gate.retyping) {
      if (key.escape) return setGate({ ...gate, retyping: false });
      return; // the text input takes the path, Enter included
    }
    if ((gate.kind === 'fatal' || crashed) && input === 'q') return quit();
    if (gate.kind === 'fatal' && relocate && input === 'r') {
      setNewPath('');
      return setGate({ ...gate, retyping: true });
    }
    // Esc at the passphrase prompt leaves (nothing is open yet).
    if (gate.kind === 'passphrase' && !gate.unlocking && key.escape) return finish();
  });

  const backend = gate.kind === 'ready' ? gate.backend : null;
  const session: Session | null = useMemo(
    () =>
      backend
        ? {
            backend,
            size,
            // A terminal too small to show a screen takes no keys for it (nothing is done unseen).
            active: !help && !tooSmall,
            quit,
            openHelp: () => setHelp(true),
            setJob,
            log: (line) => onLog?.(line),
            noteIntegrityProblem: () => onIntegrityProblem?.(),
            noteUnfinished: (target, unfinished) => onUnfinished?.(target, unfinished),
          }
        : null,
    [backend, size, help, tooSmall, quit, setJob, onLog, onIntegrityProblem, onUnfinished],
  );

  // Screens before the repository is open share a minimal session (size only).
  const bare: Session = {
    backend: null as unknown as Backend,
    size,
    active: !tooSmall,
    quit: finish,
    openHelp: () => undefined,
    setJob: () => undefined,
    log: () => undefined,
    noteIntegrityProblem: () => undefined,
    noteUnfinished: () => undefined,
  };

  const back = (notice: string | null, selected?: string | null) => setScreen((s) => ({ kind: 'list', notice, selected: selected ?? ('version' in s && s.version ? s.version.id : null) }));

  const onAction = (a: ListAction) => {
    if (a.kind === 'restore') setScreen({ kind: 'restore', version: a.version });
    else if (a.kind === 'scrub') setScreen({ kind: 'scrub', version: a.version });
    else if (a.kind === 'scrub-all') setScreen({ kind: 'scrub', version: null });
    else if (a.kind === 'tags') setScreen({ kind: 'tags', version: a.version });
    else if (a.kind === 'mount') setScreen({ kind: 'mount', version: a.version });
    else setScreen({ kind: 'remove', version: a.version });
  };

  let content: ReactNode;
  if (gate.kind !== 'ready' || !session) {
    content = (
      <SessionContext.Provider value={bare}>
        {gate.kind === 'passphrase' ? (
          <UnlockScreen location={location} error={gate.error} unlocking={gate.unlocking} onSubmit={(p) => passphraseWaiter.current?.(p)} />
        ) : gate.kind === 'fatal' && gate.retyping ? (
          <Frame
            title={`blocksafe · ${location}`}
            keys={[
              ['Enter', 'open this repository'],
              ['Esc', 'back'],
            ]}
            error={gate.error}
          >
            <Text>Type the path of the repository (a directory, or s3://bucket/prefix) and press Enter:</Text>
            <Text>
              {'> '}
              <TextInput
                value={newPath}
                onChange={setNewPath}
                active
                onSubmit={(text) => {
                  if (!relocate || !text.trim()) return;
                  try {
                    setRepoTarget(relocate(text.trim()));
                    setGate({ kind: 'opening' });
                  } catch (err) {
                    setGate({ kind: 'fatal', error: errorText(err), retyping: true });
                  }
                }}
              />
            </Text>
          </Frame>
        ) : gate.kind === 'fatal' ? (
          <Message location={location} error={gate.error} retype={!!relocate} />
        ) : (
          <Message location={location} text={`Opening ${location}…`} />
        )}
      </SessionContext.Provider>
    );
  } else {
    content = (
      <SessionContext.Provider value={session}>
        <Box display={help ? 'none' : 'flex'} flexDirection="column">
          {screen.kind === 'list' ? (
            <VersionsScreen key="list" onAction={onAction} initialSelected={screen.selected} notice={screen.notice} />
          ) : screen.kind === 'restore' ? (
            <RestoreWizard version={screen.version} onExit={(n) => back(n)} />
          ) : screen.kind === 'scrub' ? (
            <ScrubScreen version={screen.version} onExit={(n) => back(n)} />
          ) : screen.kind === 'tags' ? (
            <TagScreen version={screen.version} onExit={(n) => back(n)} />
          ) : screen.kind === 'mount' ? (
            <MountScreen version={screen.version} onExit={(n) => back(n)} />
          ) : (
            <RemoveScreen version={screen.version} onExit={(n) => back(n, n ? null : screen.version.id)} />
          )}
        </Box>
        {help ? <HelpScreen onClose={() => setHelp(false)} /> : null}
      </SessionContext.Provider>
    );
  }
  if (tooSmall) {
    // The screens stay mounted (a running restore goes on) but are not drawn: they would be cut.
    content = (
      <Box flexDirection="column">
        <Box display="none">{content}</Box>
        <Text wrap="wrap">
          {`The terminal is ${size.columns}×${size.rows}; blocksafe ui needs at least ${MIN_COLUMNS}×${MIN_ROWS}. Enlarge the window (q quits${job.current ? ' after stopping the running restore' : ''}).`}
        </Text>
      </Box>
    );
  }
  return (
    <Guard
      onError={() => {
        setCrashed(true);
        job.current?.stop();
      }}
    >
      {content}
    </Guard>
  );
}

const MIN_COLUMNS = 80;
const MIN_ROWS = 24;

const ALT_SCREEN_ON = '\x1b[?1049h\x1b[2J\x1b[H';
const ALT_SCREEN_OFF = '\x1b[?25h\x1b[?1049l';

/**
 * Runs the UI on the terminal until the user quits. Returns the exit code: 3 when a restore or scrub found
 * damage, 1 when the repository did not open or a restore was left stopped or failed, else 0. What was done
 * is printed after the terminal is restored, so it stays on record.
 *
 * A terminal that goes away (a closed window, a dropped SSH link: SIGHUP, end of input, EIO on a write)
 * stops a running restore like the Stop key does, with its checkpoint, and the UI ends cleanly: nothing is
 * written to the dead terminal any more and no error escapes.
 */
export async function runUi(opts: GlobalOptions): Promise<number> {
  const { UsageError } = await import('../src/errors.js');
  if (!process.stdin.isTTY || !process.stdout.isTTY) {
    throw new UsageError('The ui command needs an interactive terminal; in scripts use the commands ls, restore and scrub.');
  }
  const { engineConnect } = await import('./engineBackend.js');
  const { location, connect } = engineConnect(opts);
  let backend: Backend | null = null;
  const track =
    (c: Connect): Connect =>
    async (ask) =>
      (backend = await c(ask));
  const trackedConnect = track(connect);
  const relocate = (input: string) => {
    const next = engineConnect({ ...opts, repo: input });
    return { location: next.location, connect: track(next.connect) };
  };
  const lines: string[] = [];
  let integrity = false;
  let fatal = false;
  const unfinished = new Set<string>();
  const events = new EventEmitter();
  const out = process.stdout;
  let terminalGone = false;
  let restored = false;
  const restoreTerminal = () => {
    if (restored || terminalGone) return;
    restored = true;
    out.write(ALT_SCREEN_OFF);
  };
  const onSignal = () => events.emit('quit');
  const onHangup = () => {
    if (!terminalGone) {
      terminalGone = true;
      lines.push('blocksafe ui: the terminal went away; a running restore was stopped at its checkpoint.');
    }
    events.emit('quit');
  };
  // Write errors on a vanished terminal (EIO, EPIPE) and its end of input mean the same as SIGHUP.
  const onStreamError = () => onHangup();
  const onExit = () => restoreTerminal();
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGHUP', onHangup);
  process.on('exit', onExit);
  out.on('error', onStreamError);
  process.stderr.on('error', onStreamError);
  process.stdin.on('error', onStreamError);
  process.stdin.on('end', onHangup);
  // Clear the screen on resize so a shrinking window leaves no stale lines behind.
  const onResize = () => {
    if (!terminalGone) out.write('\x1b[2J\x1b[H');
  };
  out.on('resize', onResize);
  out.write(ALT_SCREEN_ON);
  try {
    const app = render(
      <App
        connect={trackedConnect}
        location={location}
        onLog={(l) => lines.push(l)}
        onIntegrityProblem={() => {
          integrity = true;
        }}
        onUnfinished={(target, yes) => {
          if (yes) unfinished.add(target);
          else unfinished.delete(target);
        }}
        onFatal={(f) => {
          fatal = f;
        }}
        relocate={relocate}
        events={events}
      />,
      { exitOnCtrlC: false, patchConsole: true },
    );
    await app.waitUntilExit();
  } finally {
    out.off('resize', onResize);
    restoreTerminal();
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    process.off('SIGHUP', onHangup);
    process.off('exit', onExit);
    process.stdin.off('end', onHangup);
    await (backend as Backend | null)?.close().catch(() => undefined);
  }
  if (!terminalGone) {
    for (const l of lines) process.stderr.write(l + '\n');
    if (lines.length === 0) process.stderr.write('blocksafe ui: nothing was changed.\n');
  }
  return integrity ? 3 : fatal || unfinished.size > 0 ? 1 : 0;
}
