/**
 * The restore wizard: version (chosen in the list) → target (a file path, or a block device from the
 * system) → check (summary; typed confirmation when something would be overwritten; resume offered when an
 * interrupted restore exists) → progress (stoppable, resumable) → result.
 */
import { Box, Text } from 'ink';
import { useEffect, useMemo, useRef, useState, type ReactNode } from 'react';
import { CancelledError, errorText, type BlockDevice, type RestoreOutcome, type TargetInfo, type VersionRecord } from './backend.js';
import { Frame, ProgressPanel, StepBar, TextInput, type KeyHint } from './components.js';
import { deviceRefusal } from './devices.js';
import { fit, fitRight, formatBytes, formatDuration, longDate, percent, statusWords } from './format.js';
import { type ProgressView, useKeys, useProgress, useSession } from './hooks.js';

const STEPS = ['Version', 'Target', 'Check', 'Restore', 'Result'];

type Phase =
  | { p: 'target' }
  | { p: 'checking' }
  | { p: 'summary'; target: TargetInfo; startOver: boolean }
  | { p: 'running'; target: TargetInfo; resume: boolean; confirmStop: boolean; stopping: boolean }
  | { p: 'result'; target: TargetInfo; outcome?: RestoreOutcome; cancelled?: boolean; error?: string; durationMs: number; last: ProgressView; stoppedAt: string };

/** A stopped restore, or one that failed after writing something, can continue where it stopped. */
function resumable(phase: Extract<Phase, { p: 'result' }>): boolean {
  return !!phase.cancelled || (!!phase.error && phase.last.progress !== null);
}

/** "81.3 % (13 of 16 blocks)": where a stopped restore continues. */
function resumePoint(done: number, blocks: number): string {
  return `${percent(done, blocks)} (${done} of ${blocks} block${blocks === 1 ? '' : 's'})`;
}

function isRbd(target: TargetInfo): boolean {
  return target.kind === 'rbd' || target.kind === 'new-rbd';
}

function versionLine(v: VersionRecord): string {
  return `${v.id} · ${v.name} · ${longDate(v.date)} · ${formatBytes(v.size)} · ${statusWords(v).join(', ')}`;
}

function DevicePicker({ devices, index, needed, width, height }: { devices: BlockDevice[]; index: number; needed: number; width: number; height: number }) {
  const nameW = Math.min(22, Math.max(10, ...devices.map((d) => d.path.length)));
  const rows = Math.max(1, height - 1);
  const start = Math.max(0, Math.min(index - Math.floor(rows / 2), devices.length - rows));
  const modelW = Math.max(6, Math.min(28, width - nameW - 56));
  return (
    <Box flexDirection="column" width={width}>
      <Text dimColor wrap="truncate-end">
        {`    ${fit('device', nameW)} ${fitRight('size', 9)}  ${fit('model', modelW)}  can it be used?`}
      </Text>
      {devices.length === 0 ? (
        <Text>{'    '}No block devices with a medium were found. Plug the disk in and press r to look again.</Text>
      ) : (
        devices.slice(start, start + rows).map((d, i) => {
          const refusal = deviceRefusal(d, needed);
          const sel = start + i === index;
          return (
            <Box key={d.path} width={width} height={1} overflow="hidden">
              <Text inverse={sel} bold={sel} dimColor={!!refusal && !sel} wrap="truncate-end">
                {sel ? '  > ' : '    '}
                {fit(d.path, nameW)} {fitRight(formatBytes(d.size), 9)} {fit(d.model || '-', modelW)}
                {'  '}
                {refusal ? <Text color="red">{`NO: ${refusal}`}</Text> : <Text color="green">yes (will be overwritten)</Text>}
              </Text>
            </Box>
          );
        })
      )}
    </Box>
  );
}

function Summary({ v, target }: { v: VersionRecord; target: TargetInfo }) {
  const effect =
    target.kind === 'new-file'
      ? 'A new file is created; nothing is overwritten.'
      : target.kind === 'new-rbd'
        ? `A new RBD image of ${formatBytes(v.size)} (${v.size} bytes) is created, thin: only non-zero blocks are written.`
        : target.kind === 'rbd'
          ? `The existing RBD image (${formatBytes(target.size)}) is OVERWRITTEN and resized to ${formatBytes(v.size)}; its current contents are lost.`
          : target.kind === 'block'
            ? `ALL DATA on ${target.path} is lost: its first ${formatBytes(v.size)} are overwritten with this version.`
            : target.overwrites
              ? `The existing file (${formatBytes(target.size)}) is OVERWRITTEN; its current contents are lost.`
              : 'The existing file is empty; nothing is lost.';
  return (
    <Box flexDirection="column">
      <Box>
        <Box width={9} flexShrink={0}>
          <Text dimColor>Version</Text>
        </Box>
        <Text wrap="truncate-end">{versionLine(v)}</Text>
      </Box>
      <Box>
        <Box width={9} flexShrink={0}>
          <Text dimColor>Target</Text>
        </Box>
        <Text wrap="truncate-end">
          <Text bold>{target.path}</Text>
          {target.description ? ` (${target.description}${target.kind === 'block' ? `, ${formatBytes(target.size)}` : ''})` : ''}
        </Text>
      </Box>
      <Box>
        <Box width={9} flexShrink={0}>
          <Text dimColor>Effect</Text>
        </Box>
        <Text color={target.overwrites ? 'yellow' : 'green'} bold={target.overwrites} wrap="wrap">
          {effect}
        </Text>
      </Box>
      {target.contents ? (
        <Box>
          <Box width={9} flexShrink={0}>
            <Text dimColor>Holds</Text>
          </Box>
          <Text wrap="wrap">{`${target.contents} (what is lost)`}</Text>
        </Box>
      ) : null}
      {!v.valid ? (
        <Text color="red" wrap="wrap">
          This version is INVALID: some of its blocks are damaged. They are reported and read as zeros on the target (never old data); everything else is restored.
        </Text>
      ) : null}
      {target.warning ? (
        <Text color="yellow" wrap="wrap">
          Warning: {target.warning}
        </Text>
      ) : null}
      <Text dimColor>Every block is verified as it is written.</Text>
    </Box>
  );
}

/** What to do after a restore: look at the result without changing it; the same restore from a script. */
function NextSteps({ target, command }: { target: TargetInfo; command: string | null }) {
  const look =
    target.kind === 'block'
      ? `Next: fsck -n ${target.path} checks a filesystem without changing it; mount -o ro ${target.path} /mnt shows its files read-only.`
      : isRbd(target)
        ? `Next: rbd map --read-only ${target.path.slice('rbd://'.length)} attaches the image read-only; then fsck -n or mount -o ro the device it prints.`
        : `Next: losetup --find --show --read-only --partscan ${target.path} attaches the image read-only; then fsck -n or mount -o ro the device it prints.`;
  return (
    <Box flexDirection="column" marginTop={1}>
      <Text wrap="wrap">{look}</Text>
      {command ? <Text wrap="wrap" dimColor>{`The same from a script: ${command}`}</Text> : null}
    </Box>
  );
}

export function RestoreWizard({ version, onExit }: { version: VersionRecord; onExit: (notice: string | null) => void }) {
  const { backend, size, active, quit, openHelp, setJob, log, noteIntegrityProblem, noteUnfinished } = useSession();
  const blocks = Math.ceil(version.size / version.block_size);
  const [phase, setPhase] = useState<Phase>({ p: 'target' });
  const [mode, setMode] = useState<'path' | 'device'>('path');
  const [pathText, setPathText] = useState('');
  const [devices, setDevices] = useState<BlockDevice[] | null>(null);
  const [devIndex, setDevIndex] = useState(0);
  const [typed, setTyped] = useState('');
  const [error, setError] = useState<string | null>(null);
  const { view, listener, reset, snapshot } = useProgress();
  const ctl = useRef<AbortController | null>(null);
  const startedAt = useRef(0);
  const forced = useRef(false);
  // An INVALID version: its damaged blocks may be taken from another version (Tab on the Check step).
  const [fillFrom, setFillFrom] = useState<VersionRecord | null>(null);
  const fillCandidates = useMemo(() => {
    if (version.valid) return [];
    try {
      return backend
        .listVersions()
        .filter((x) => x.id !== version.id && x.complete && x.block_size === version.block_size)
        .sort((a, b) => Number(b.name === version.name) - Number(a.name === version.name) || Number(b.valid) - Number(a.valid) || b.date.localeCompare(a.date));
    } catch {
      return [];
    }
  }, [backend, version]);

  const loadDevices = () => {
    try {
      const list = backend.listDevices();
      setDevices(list);
      // Start on the first device that can be used.
      const first = list.findIndex((d) => deviceRefusal(d, version.size) === null);
      setDevIndex(first >= 0 ? first : 0);
    } catch (err) {
      setDevices([]);
      setError(`Could not list the block devices: ${errorText(err)}`);
    }
  };

  useEffect(() => {
    if (mode === 'device' && devices === null) loadDevices();
  }, [mode]);

  const check = (path: string) => {
    setError(null);
    setPhase({ p: 'checking' });
    backend.inspectTarget(path, version).then(
      (target) => {
        if (target.refusal) {
          setError(target.refusal);
          setPhase({ p: 'target' });
        } else {
          setTyped('');
          setPhase({ p: 'summary', target, startOver: false });
        }
      },
      (err) => {
        setError(errorText(err));
        setPhase({ p: 'target' });
      },
    );
  };

  const submitPath = (text: string) => {
    if (!text.trim()) return setError('Type a file path or rbd://POOL/IMAGE first, e.g. /mnt/restore/disk.img (or press Tab to choose a block device).');
    check(text);
  };

  /** The typed-name confirmation: the only way to get force = true. */
  const submitTyped = (target: TargetInfo, text: string) => {
    // The name, or the whole path (/dev/loop0 for loop0) as people often type it.
    if (text.trim() === target.name || text.trim() === target.path) return start(target, { force: true, resume: false });
    setError(text ? `You typed "${text}", not "${target.name}": nothing was written. Type ${target.name} exactly.` : `Type ${target.name} and press Enter to overwrite it, or Esc to go back.`);
  };

  const start = (target: TargetInfo, opts: { force: boolean; resume: boolean }) => {
    setError(null);
    reset();
    const controller = new AbortController();
    ctl.current = controller;
    forced.current = opts.force;
    startedAt.current = Date.now();
    setPhase({ p: 'running', target, resume: opts.resume, confirmStop: false, stopping: false });
    setJob({
      stop: () => {
        controller.abort();
        setPhase((ph) => (ph.p === 'running' ? { ...ph, confirmStop: false, stopping: true } : ph));
      },
    });
    const what = `version ${version.id} (${version.name}, ${longDate(version.date)}) to ${target.path}`;
    const req = { target: target.path, force: opts.force, resume: opts.resume, ...(fillFrom && !isRbd(target) ? { fillFrom: fillFrom.id } : {}) };
    backend.restore(version, req, listener, controller.signal).then(
      (outcome) => {
        setJob(null);
        noteUnfinished(target.path, false);
        const durationMs = Date.now() - startedAt.current;
        if (outcome.damaged.length) {
          noteIntegrityProblem();
          log(`Restored ${what} with ${outcome.damaged.length} DAMAGED range(s), which read as zeros:`);
          for (const d of outcome.damaged) log(`  offset ${d.offset} length ${d.length}: ${d.reason}`);
        } else log(`Restored ${what}: ${formatBytes(version.size)}, every block verified; ${outcome.bytesWritten} bytes written by this run.`);
        setPhase({ p: 'result', target, outcome, durationMs, last: snapshot(), stoppedAt: '' });
      },
      (err) => {
        setJob(null);
        noteUnfinished(target.path, true);
        const durationMs = Date.now() - startedAt.current;
        const last = snapshot();
        // Where a resume continues is the engine's checkpoint; the Check step shows the same figure.
        const stoppedAt =
          err instanceof CancelledError && err.blocksDone !== undefined ? resumePoint(err.blocksDone, blocks) : last.progress ? percent(last.progress.doneBytes, last.progress.totalBytes) : '0.0 %';
        if (err instanceof CancelledError) {
          log(`Restore of ${what} STOPPED at ${stoppedAt}; the target is incomplete. Resume: blocksafe ui, or blocksafe restore --resume ${version.id} ${target.path}`);
          setPhase({ p: 'result', target, cancelled: true, durationMs, last, stoppedAt });
        } else {
          log(`Restore of ${what} FAILED: ${errorText(err)}`);
          setPhase({ p: 'result', target, error: errorText(err), durationMs, last, stoppedAt });
        }
      },
    );
  };

  useKeys(
    (input, key) => {
      switch (phase.p) {
        case 'target': {
          if (key.escape) return onExit(null);
          if (key.tab) {
            setError(null);
            return setMode((m) => (m === 'path' ? 'device' : 'path'));
          }
          if (mode === 'path') return; // the text input takes the rest, Enter included
          const list = devices ?? [];
          const last = Math.max(0, list.length - 1);
          const page = Math.max(1, bodyHeight - 9);
          if (key.upArrow || input === 'k') return setDevIndex((i) => Math.max(0, i - 1));
          if (key.downArrow || input === 'j') return setDevIndex((i) => Math.min(last, i + 1));
          if (key.pageUp) return setDevIndex((i) => Math.max(0, i - page));
          if (key.pageDown) return setDevIndex((i) => Math.min(last, i + page));
          if (key.home || input === 'g') return setDevIndex(0);
          if (key.end || input === 'G') return setDevIndex(last);
          if (input === 'r') {
            setError(null);
            return loadDevices();
          }
          if (input === 'q') return quit();
          if (input === '?') return openHelp();
          if (key.return) {
            const d = list[devIndex];
            if (!d) return setError('There is no device to choose; press r to look again, or Tab to type a file path.');
            const refusal = deviceRefusal(d, version.size);
            if (refusal) return setError(`${d.path} cannot be chosen: ${refusal}${d.mountpoints.length ? ' (unmount it first)' : ''}.`);
            return check(d.path);
          }
          return;
        }
        case 'checking':
          return;
        case 'summary': {
          const { target } = phase;
          const sameInterrupted = target.interrupted?.version === version.id;
          // Filling damaged blocks from another version is for files and devices only (the RBD restore has no fill).
          if (key.tab && fillCandidates.length && !isRbd(target)) {
            // none → first candidate → … → none
            const i = fillFrom ? fillCandidates.findIndex((x) => x.id === fillFrom.id) : -1;
            return setFillFrom(i + 1 < fillCandidates.length ? fillCandidates[i + 1]! : null);
          }
          if (key.escape) {
            setError(null);
            return setPhase({ p: 'target' });
          }
          if (sameInterrupted && !phase.startOver) {
            if (input === 'r') return start(target, { force: false, resume: true });
            if (input === 'o') {
              setTyped('');
              return setPhase({ ...phase, startOver: true });
            }
            if (input === 'q') return quit();
            if (input === '?') return openHelp();
            return;
          }
          const needTyped = target.overwrites || !!target.interrupted;
          if (!needTyped) {
            if (key.return) return start(target, { force: false, resume: false });
            if (input === 'q') return quit();
            if (input === '?') return openHelp();
            return;
          }
          return; // the text input takes the name, Enter included
        }
        case 'running': {
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
        case 'result': {
          if (resumable(phase) && input === 'r') return start(phase.target, { force: false, resume: true });
          if (key.return || key.escape) {
            const notice = phase.outcome
              ? phase.outcome.damaged.length
                ? `Restored ${version.id} to ${phase.target.path} with ${phase.outcome.damaged.length} DAMAGED range(s).`
                : `Restored ${version.id} to ${phase.target.path}; every block verified.`
              : phase.cancelled
                ? `Restore of ${version.id} to ${phase.target.path} stopped; choose the same version and target to resume.`
                : null;
            return onExit(notice);
          }
          if (input === 'q') return quit();
          if (input === '?') return openHelp();
          return;
        }
      }
    },
    { isActive: active },
  );

  const width = size.columns;
  const bodyHeight = Math.max(5, size.rows - 4);
  let step = 1;
  let verdict: string | undefined;
  let keys: KeyHint[] = [];
  let body: ReactNode;

  switch (phase.p) {
    case 'target':
    case 'checking': {
      step = 1;
      const pathActive = active && phase.p === 'target' && mode === 'path';
      keys =
        mode === 'path'
          ? [
              ['Enter', 'use this path'],
              ['Tab', 'block devices'],
              ['Esc', 'back'],
              ['ctrl-c', 'quit'],
            ]
          : [
              ['↑↓', 'select'],
              ['Enter', 'choose'],
              ['r', 'rescan'],
              ['Tab', 'type a file path'],
              ['Esc', 'back'],
              ['?', 'help'],
              ['q', 'quit'],
            ];
      body = (
        <Box flexDirection="column">
          <Text wrap="truncate-end">
            <Text dimColor>Version </Text>
            {versionLine(version)}
          </Text>
          <Text> </Text>
          <Text bold>Where should it be restored to?</Text>
          <Text wrap="truncate-end">
            {mode === 'path' ? <Text bold>(*) </Text> : <Text dimColor>( ) </Text>}
            <Text bold={mode === 'path'}>A file: </Text>
            <TextInput
              value={pathText}
              onChange={setPathText}
              onSubmit={submitPath}
              active={pathActive}
              placeholder={mode === 'path' ? 'type a path, e.g. /mnt/restore/disk.img, or rbd://POOL/IMAGE' : ''}
            />
          </Text>
          <Text>
            {mode === 'device' ? <Text bold>(*) </Text> : <Text dimColor>( ) </Text>}
            <Text bold={mode === 'device'}>A block device</Text>
            {mode === 'path' ? <Text dimColor> (press Tab to see the list)</Text> : <Text dimColor> (mounted, busy and too small ones cannot be chosen)</Text>}
          </Text>
          {mode === 'device' && devices ? <DevicePicker devices={devices} index={devIndex} needed={version.size} width={width} height={bodyHeight - 7} /> : null}
          {phase.p === 'checking' ? <Text color="cyan">Checking the target…</Text> : null}
        </Box>
      );
      break;
    }
    case 'summary': {
      step = 2;
      const { target } = phase;
      const sameInterrupted = target.interrupted?.version === version.id;
      const needTyped = target.overwrites || !!target.interrupted;
      if (sameInterrupted && !phase.startOver) {
        keys = [
          ['r', 'resume (recommended)'],
          ['o', 'start over'],
          ['Esc', 'back'],
          ['?', 'help'],
          ['q', 'quit'],
        ];
      } else if (needTyped) {
        keys = [
          ['Enter', 'overwrite after typing the name'],
          ['Esc', 'back'],
          ['ctrl-c', 'quit'],
        ];
      } else {
        keys = [
          ['Enter', 'start the restore'],
          ['Esc', 'back'],
          ['?', 'help'],
          ['q', 'quit'],
        ];
      }
      body = (
        <Box flexDirection="column">
          <Text bold>Check before restoring</Text>
          <Summary v={version} target={target} />
          {!version.valid ? (
            <Text wrap="wrap">
              {fillFrom && !isRbd(target)
                ? `Damaged blocks: taken from version ${fillFrom.id} (${fillFrom.name}, ${longDate(fillFrom.date)}) where it has them intact, else zeros.`
                : 'Damaged blocks: written as zeros.'}
              {fillCandidates.length && !isRbd(target) ? <Text dimColor>{' Tab: fill them from another version.'}</Text> : null}
            </Text>
          ) : null}
          <Text> </Text>
          {target.interrupted ? (
            <Text color="yellow" wrap="wrap">
              {sameInterrupted
                ? `An interrupted restore of this version to this target exists (started ${longDate(target.interrupted.started)}): it resumes at ${resumePoint(target.interrupted.blocks_done, blocks)}.`
                : `An interrupted restore of ANOTHER version (${target.interrupted.version}) to this target exists; starting this one abandons it.`}
            </Text>
          ) : null}
          {sameInterrupted && !phase.startOver ? (
            <Text>
              Press <Text bold>r</Text> to resume where it stopped, or <Text bold>o</Text> to start over from the beginning.
            </Text>
          ) : needTyped ? (
            <Box flexDirection="column">
              <Text>
                To overwrite it, type its name <Text bold inverse>{` ${target.name} `}</Text> and press Enter:
              </Text>
              <Text>
                {'> '}
                <TextInput value={typed} onChange={setTyped} onSubmit={(text) => submitTyped(target, text)} active={active} />
              </Text>
            </Box>
          ) : (
            <Text>
              Press <Text bold>Enter</Text> to start the restore.
            </Text>
          )}
        </Box>
      );
      break;
    }
    case 'running': {
      step = 3;
      keys = phase.confirmStop
        ? [
            ['y', 'yes, stop'],
            ['n', 'no, keep going'],
          ]
        : phase.stopping
          ? [['…', 'stopping after the blocks in flight, please wait']]
          : [
              ['Esc', 'stop safely'],
              ['ctrl-c', 'stop without asking'],
              ['?', 'help'],
            ];
      body = (
        <Box flexDirection="column">
          <Text wrap="truncate-end">
            {phase.resume ? 'Resuming' : 'Restoring'} <Text bold>{version.id}</Text> ({version.name}, {longDate(version.date)}) to <Text bold>{phase.target.path}</Text>
          </Text>
          <Text> </Text>
          <ProgressPanel view={view} width={width} damagedLabel="Damaged ranges so far" preparing="verifying the block map before writing…" />
          <Text> </Text>
          {phase.stopping ? (
            <Text color="yellow">Stopping after the blocks in flight… (the restore can be resumed later)</Text>
          ) : phase.confirmStop ? (
            <Text color="yellow" bold wrap="wrap">
              Stop the restore? The target stays incomplete until you resume it (choose the same version and target again). y = stop, n = keep going.
            </Text>
          ) : (
            <Text dimColor wrap="wrap">
              Esc or ctrl-c stops safely after the blocks in flight; the restore can be resumed later.
            </Text>
          )}
        </Box>
      );
      break;
    }
    case 'result': {
      step = 4;
      const { outcome } = phase;
      verdict = outcome ? (outcome.damaged.length ? 'DAMAGED' : 'ok') : phase.cancelled ? 'STOPPED' : 'FAILED';
      keys = [['Enter', 'back to the list'], ...(resumable(phase) ? ([['r', 'resume']] as KeyHint[]) : []), ['?', 'help'], ['q', 'quit']];
      body = (
        <Box flexDirection="column">
          {outcome && outcome.damaged.length === 0 ? (
            <Box flexDirection="column">
              <Text color="green" bold>
                DONE: the restore finished and every block was verified.
              </Text>
              <Text wrap="wrap">
                Version {version.id} ({version.name}, {longDate(version.date)}, {formatBytes(version.size)}) is now on {phase.target.path}. Took {formatDuration(phase.durationMs)}.
              </Text>
              <NextSteps target={phase.target} command={`blocksafe restore --repo ${backend.summary.location}${forced.current ? ' --force' : ''} ${version.id} ${phase.target.path}`} />
            </Box>
          ) : outcome ? (
            <Box flexDirection="column">
              <Text color="red" bold wrap="wrap">
                FINISHED WITH DAMAGE: {outcome.damaged.length} range(s) could not be restored; they read as zeros.
              </Text>
              <Text wrap="wrap">
                Everything else of version {version.id} is on {phase.target.path}. An older or newer version may hold intact copies of these blocks.
              </Text>
              {outcome.damaged.slice(0, Math.max(1, bodyHeight - 8)).map((d) => (
                <Text key={d.offset} color="red" wrap="truncate-end">
                  DAMAGED offset {d.offset} ({formatBytes(d.offset)}), {formatBytes(d.length)}: {d.reason}
                </Text>
              ))}
              {outcome.damaged.length > bodyHeight - 8 ? <Text dimColor>… and more (the full list is printed when you quit).</Text> : null}
              <NextSteps target={phase.target} command={null} />
            </Box>
          ) : phase.cancelled ? (
            <Box flexDirection="column">
              <Text color="yellow" bold>
                STOPPED at {phase.stoppedAt}. The target is incomplete.
              </Text>
              <Text wrap="wrap">Press r to resume now, or later: choose the same version and target and the restore continues from {phase.stoppedAt}.</Text>
            </Box>
          ) : (
            <Box flexDirection="column">
              <Text color="red" bold>
                The restore did not finish.
              </Text>
              <Text color="red" wrap="wrap">
                Error: {phase.error}
              </Text>
              <Text wrap="wrap">{resumable(phase) ? 'Fix the problem, then press r to resume where it stopped, or Enter to go back.' : 'Press Enter to go back.'}</Text>
            </Box>
          )}
        </Box>
      );
      break;
    }
  }

  return (
    <Frame title="blocksafe · restore" right={backend.summary.location} keys={keys} error={error}>
      <StepBar steps={STEPS} current={step} verdict={verdict} />
      <Text> </Text>
      {body}
    </Frame>
  );
}
