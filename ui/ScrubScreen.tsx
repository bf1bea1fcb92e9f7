/**
 * Scrub: re-read stored blocks of one version or of the whole repository (optionally only a percentage,
 * those verified longest ago), with progress, and a result that names the versions found damaged.
 * Shown only when the backend has a scrub (the engine's scrub()).
 */
import { Box, Text } from 'ink';
import { useRef, useState, type ReactNode } from 'react';
import type { ScrubResult } from '../src/engine/scrub.js';
import { CancelledError, errorText, type VersionRecord } from './backend.js';
import { Frame, ProgressPanel, TextInput, type KeyHint } from './components.js';
import { formatBytes, formatDuration, longDate, percent } from './format.js';
import { useKeys, useProgress, useSession } from './hooks.js';

type Phase = { p: 'setup' } | { p: 'running'; confirmStop: boolean; stopping: boolean } | { p: 'result'; result?: ScrubResult; cancelled?: boolean; error?: string; durationMs: number };

export function ScrubScreen({ version, onExit }: { version: VersionRecord | null; onExit: (notice: string | null) => void }) {
  const { backend, size, active, quit, openHelp, setJob, log, noteIntegrityProblem } = useSession();
  const [whole, setWhole] = useState(version === null);
  const [pct, setPct] = useState('100');
  const [phase, setPhase] = useState<Phase>({ p: 'setup' });
  const [error, setError] = useState<string | null>(null);
  const { view, listener, reset } = useProgress();
  const ctl = useRef<AbortController | null>(null);

  const scope = whole || !version ? 'the whole repository' : `version ${version.id} (${version.name}, ${longDate(version.date)})`;

  const start = (pct: string) => {
    const scrub = backend.scrub;
    if (!scrub) return;
    const n = Number(pct);
    if (!pct || !Number.isFinite(n) || n <= 0 || n > 100) return setError(`The percentage must be a number from 1 to 100 (got "${pct}").`);
    setError(null);
    reset();
    const controller = new AbortController();
    ctl.current = controller;
    const t0 = Date.now();
    setPhase({ p: 'running', confirmStop: false, stopping: false });
    setJob({
      stop: () => {
        controller.abort();
        setPhase((ph) => (ph.p === 'running' ? { ...ph, confirmStop: false, stopping: true } : ph));
      },
    });
    scrub({ versions: whole || !version ? [] : [version], percent: n === 100 ? undefined : n }, listener, controller.signal).then(
      (result) => {
        setJob(null);
        if (result.damaged.length) {
          noteIntegrityProblem();
          log(`Scrub of ${scope}: ${result.damaged.length} DAMAGED block(s); versions now INVALID: ${result.invalid_versions.join(', ') || 'none'}.`);
          for (const d of result.damaged) log(`  DAMAGED ${d.reason}`);
        } else log(`Scrub of ${scope}: ${result.blocks_checked} blocks verified, none damaged.`);
        setPhase({ p: 'result', result, durationMs: Date.now() - t0 });
      },
      (err) => {
        setJob(null);
        if (err instanceof CancelledError) {
          log(`Scrub of ${scope} stopped by the user.`);
          setPhase({ p: 'result', cancelled: true, durationMs: Date.now() - t0 });
        } else {
          log(`Scrub of ${scope} FAILED: ${errorText(err)}`);
          setPhase({ p: 'result', error: errorText(err), durationMs: Date.now() - t0 });
        }
      },
    );
  };

  useKeys(
    (input, key) => {
      if (phase.p === 'setup') {
        if (key.escape) return onExit(null);
        if ((key.upArrow || key.downArrow) && version) return setWhole((w) => !w);
        return; // digits and Enter go to the percentage field
      }
      if (phase.p === 'running') {
        if (phase.stopping) return;
        if (phase.confirmStop) {
          if (input === 'y' || input === 'Y') {
            ctl.current?.abort();
            return setPhase({ ...phase, confirmStop: false, stopping: true });
          }
          if (input === 'n' || input === 'N' || key.escape) return setPhase({ ...phase, confirmStop: false });
          return;
        }
        if (key.escape || input === 'q') return setPhase({ ...phase, confirmStop: true });
        if (input === '?') return openHelp();
        return;
      }
      if (key.return || key.escape) {
        const r = phase.result;
        return onExit(
          r ? (r.damaged.length ? `Scrub found ${r.damaged.length} DAMAGED block(s); affected versions are marked INVALID.` : `Scrub verified ${r.blocks_checked} blocks; none damaged.`) : null,
        );
      }
      if (input === 'q') return quit();
      if (input === '?') return openHelp();
    },
    { isActive: active },
  );

  const nameOf = (id: string) => {
    const v = backend.listVersions().find((x) => x.id === id);
    return v ? `${id} (${v.name}, ${longDate(v.date)})` : id;
  };

  let keys: KeyHint[];
  let body: ReactNode;
  if (phase.p === 'setup') {
    keys = [['Enter', 'start'], ...(version ? ([['↑↓', 'what to scrub']] as KeyHint[]) : []), ['Esc', 'back'], ['ctrl-c', 'quit']];
    body = (
      <Box flexDirection="column">
        <Text bold>Scrub: re-read stored blocks and verify them</Text>
        <Text dimColor wrap="wrap">
          Damaged blocks are marked, the versions using them become INVALID, and the next backup stores those blocks again.
        </Text>
        <Text> </Text>
        {version ? (
          <Text wrap="truncate-end">
            {whole ? '( ) ' : <Text bold>(*) </Text>}
            this version: {version.id} ({version.name}, {longDate(version.date)}, {formatBytes(version.size)})
          </Text>
        ) : null}
        <Text>
          {whole ? <Text bold>(*) </Text> : '( ) '}
          the whole repository (every stored block once)
        </Text>
        <Text> </Text>
        <Text>
          Percentage: <TextInput value={pct} onChange={setPct} onSubmit={start} accept={/[0-9.]/} active={active && phase.p === 'setup'} />
          <Text dimColor> % (of the blocks verified longest ago; 15 each night covers all in a week)</Text>
        </Text>
      </Box>
    );
  } else if (phase.p === 'running') {
    keys = phase.confirmStop
      ? [
          ['y', 'yes, stop'],
          ['n', 'no, keep going'],
        ]
      : phase.stopping
        ? [['…', 'stopping, please wait']]
        : [
            ['Esc', 'stop'],
            ['ctrl-c', 'stop without asking'],
            ['?', 'help'],
          ];
    body = (
      <Box flexDirection="column">
        <Text wrap="truncate-end">Scrubbing {scope}</Text>
        <Text> </Text>
        <ProgressPanel view={view} width={size.columns} damagedLabel="Damaged blocks so far" />
        <Text> </Text>
        {phase.stopping ? (
          <Text color="yellow">Stopping after the blocks in flight…</Text>
        ) : phase.confirmStop ? (
          <Text color="yellow" bold>
            Stop the scrub? Blocks checked so far may not be recorded. y = stop, n = keep going.
          </Text>
        ) : (
          <Text dimColor>Esc or ctrl-c stops the scrub; nothing in the repository is changed by stopping.</Text>
        )}
      </Box>
    );
  } else {
    keys = [
      ['Enter', 'back to the list'],
      ['?', 'help'],
      ['q', 'quit'],
    ];
    const r = phase.result;
    const room = Math.max(1, size.rows - 14);
    body = r ? (
      <Box flexDirection="column">
        {r.damaged.length ? (
          <Text color="red" bold wrap="wrap">
            DAMAGE FOUND: {r.damaged.length} of {r.blocks_checked} blocks are damaged.
          </Text>
        ) : (
          <Text color="green" bold>
            DONE: all {r.blocks_checked} blocks checked are intact.
          </Text>
        )}
        <Text wrap="wrap">
          Checked {r.blocks_checked} of {r.blocks_selected} blocks ({formatBytes(r.bytes_checked)}) of {scope} in {formatDuration(phase.durationMs)}
          {r.blocks_due !== null ? `; ${r.blocks_due} blocks are still due in this cycle` : ''}.
        </Text>
        {r.invalid_versions.length ? (
          <Box flexDirection="column">
            <Text bold>Versions with damaged blocks (INVALID):</Text>
            {r.invalid_versions.slice(0, room).map((id) => (
              <Text key={id} color="red" wrap="truncate-end">
                {'  INVALID '}
                {nameOf(id)}
                {r.invalidated_versions.includes(id) ? '  (new)' : ''}
              </Text>
            ))}
            {r.invalid_versions.length > room ? <Text dimColor>{`  … and ${r.invalid_versions.length - room} more`}</Text> : null}
            <Text dimColor wrap="wrap">
              They can still be restored: the damaged blocks are reported and skipped. The next backup of the volume heals them.
            </Text>
          </Box>
        ) : null}
        {r.damaged.slice(0, 3).map((d) => (
          <Text key={d.checksum} color="red" wrap="truncate-end">
            {'  DAMAGED '}
            {d.reason}
          </Text>
        ))}
        {r.damaged.length > 3 ? <Text dimColor>{`  … and ${r.damaged.length - 3} more damaged blocks (listed when you quit)`}</Text> : null}
        {r.revalidated_versions.length ? <Text color="green">Valid again: {r.revalidated_versions.join(', ')}</Text> : null}
      </Box>
    ) : phase.cancelled ? (
      <Text color="yellow" bold>
        STOPPED: the scrub was stopped before the end ({view.progress ? percent(view.progress.doneBytes, view.progress.totalBytes) : '0 %'}).
      </Text>
    ) : (
      <Box flexDirection="column">
        <Text color="red" bold>
          The scrub did not finish.
        </Text>
        <Text color="red" wrap="wrap">
          Error: {phase.error}
        </Text>
      </Box>
    );
  }

  return (
    <Frame title="blocksafe · scrub" right={backend.summary.location} keys={keys} error={error}>
      {body}
    </Frame>
  );
}
