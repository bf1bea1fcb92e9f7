/** Building blocks of every screen: the frame with title, error line and key help, a text input, progress. */
import { Box, Text } from 'ink';
import { useRef, type ReactNode } from 'react';
import { bar, fit, formatBytes, formatDuration, percent } from './format.js';
import { useKeys, useSession, type ProgressView } from './hooks.js';

/** [key, what it does], e.g. ['Enter', 'restore']. */
export type KeyHint = [string, string];

/**
 * The key help line: always at the bottom, keys in bold and inverse (readable without colour). When it does
 * not fit, hints are dropped from the middle: the first ones (the screen's main keys) and the last ones
 * ("? help", "q quit") always stay.
 */
export function KeyBar({ keys, width }: { keys: KeyHint[]; width: number }) {
  const shown = [...keys];
  const len = (ks: KeyHint[]) => ks.reduce((n, [k, label], i) => n + (i > 0 ? 2 : 0) + k.length + 1 + label.length, 1);
  while (len(shown) > width && shown.length > 3) shown.splice(shown.length - 3, 1);
  return (
    <Box width={width} height={1} overflow="hidden">
      <Text wrap="truncate-end">
        {' '}
        {shown.map(([k, label], i) => (
          <Text key={k + label}>
            {i > 0 ? '  ' : ''}
            <Text bold inverse>
              {k}
            </Text>
            {` ${label}`}
          </Text>
        ))}
      </Text>
    </Box>
  );
}

/** Rows the error line needs: one, or up to three when a long message would otherwise lose its end. */
export function errorRows(error: string | null | undefined, width: number): number {
  if (!error) return 1;
  return Math.max(1, Math.min(3, Math.ceil(('Error: ' + error).length / Math.max(20, width))));
}

/** The error: one message, red AND prefixed with "Error:", so it reads on any console; never a stack trace. */
export function ErrorLine({ error, width }: { error: string | null | undefined; width: number }) {
  const rows = errorRows(error, width);
  return (
    <Box width={width} height={rows} overflow="hidden">
      {error ? (
        <Text color="red" bold wrap={rows > 1 ? 'wrap' : 'truncate-end'}>
          Error: {error}
        </Text>
      ) : (
        <Text> </Text>
      )}
    </Box>
  );
}

/** Rows of a Frame's body at this terminal size with this error (the screens lay themselves out in it). */
export function frameBodyRows(size: { columns: number; rows: number }, error: string | null | undefined): number {
  return Math.max(8, size.rows - 1) - 2 - errorRows(error, size.columns);
}

/**
 * A whole screen: title line, body (cut to fit), the error line, and the key help. The body gets the rest;
 * one line stays free at the bottom so Ink never has to repaint the whole terminal.
 */
export function Frame({ title, right, keys, error, children }: { title: string; right?: string; keys: KeyHint[]; error?: string | null; children: ReactNode }) {
  const { size } = useSession();
  const width = size.columns;
  const height = Math.max(8, size.rows - 1);
  const rightText = right ?? '';
  const titleWidth = Math.max(0, width - rightText.length - 1);
  return (
    <Box flexDirection="column" width={width} height={height}>
      <Box width={width} height={1} overflow="hidden">
        <Text bold inverse wrap="truncate-end">
          {fit(` ${title}`, titleWidth)}
          {rightText ? `${rightText} ` : ''}
        </Text>
      </Box>
      <Box flexDirection="column" width={width} height={frameBodyRows(size, error)} overflow="hidden">
        {children}
      </Box>
      <ErrorLine error={error} width={width} />
      <KeyBar keys={keys} width={width} />
    </Box>
  );
}

/**
 * A one-line text input (the cursor is always at the end). Backspace deletes, ctrl-u clears, Enter submits
 * the current text. `active` decides whether it takes keys; the caller handles Esc and Tab.
 */
export function TextInput({
  value,
  onChange,
  onSubmit,
  active,
  mask,
  placeholder,
  accept,
}: {
  value: string;
  onChange: (value: string) => void;
  onSubmit?: (value: string) => void;
  active: boolean;
  mask?: boolean;
  placeholder?: string;
  /** Characters allowed (e.g. /[0-9]/); anything else is ignored. */
  accept?: RegExp;
}) {
  // Several keys can arrive in one event: work on the latest text, not the one of the last render.
  const latest = useRef(value);
  latest.current = value;
  const set = (v: string) => {
    latest.current = v;
    onChange(v);
  };
  useKeys(
    (input, key) => {
      if (key.return) return onSubmit?.(latest.current);
      if (key.backspace || key.delete) return set(latest.current.slice(0, -1));
      if (key.ctrl && input === 'u') return set('');
      if (key.ctrl || key.meta || key.escape || key.tab || key.upArrow || key.downArrow || key.leftArrow || key.rightArrow) return;
      if (key.pageUp || key.pageDown || key.home || key.end) return;
      let text = input.replace(/[\u0000-\u001f\u007f]/g, '');
      if (accept) text = [...text].filter((c) => accept.test(c)).join('');
      if (text) set(latest.current + text);
    },
    { isActive: active },
  );
  const shown = mask ? '*'.repeat(value.length) : value;
  return (
    <Text>
      {shown}
      {active ? <Text inverse> </Text> : null}
      {!value && placeholder ? <Text dimColor>{placeholder}</Text> : null}
    </Text>
  );
}

/**
 * "[1 Version] › 2 Target › …": the current step in brackets and bold, so it shows without colour. Steps
 * before it are "ok", except the one just before the current when `verdict` says otherwise (a restore
 * that stopped or failed is not "Restore ok").
 */
export function StepBar({ steps, current, verdict }: { steps: string[]; current: number; verdict?: string }) {
  return (
    <Text wrap="truncate-end">
      {steps.map((s, i) => (
        <Text key={s}>
          {i > 0 ? <Text dimColor> › </Text> : null}
          {i === current ? (
            <Text bold color="cyan">
              [{i + 1} {s}]
            </Text>
          ) : i < current ? (
            <Text color={i === current - 1 && verdict && verdict !== 'ok' ? 'red' : undefined} bold={i === current - 1 && !!verdict && verdict !== 'ok'}>
              {i + 1} {s} {i === current - 1 && verdict ? verdict : 'ok'}
            </Text>
          ) : (
            <Text dimColor>
              {i + 1} {s}
            </Text>
          )}
        </Text>
      ))}
    </Text>
  );
}

/** Bar, bytes, throughput, ETA, elapsed time and damage count of a running operation. */
export function ProgressPanel({ view, width, damagedLabel, preparing = 'starting…' }: { view: ProgressView; width: number; damagedLabel: string; preparing?: string }) {
  const p = view.progress;
  const done = p?.doneBytes ?? 0;
  const total = p?.totalBytes ?? 0;
  const barWidth = Math.max(10, Math.min(60, width - 14));
  return (
    <Box flexDirection="column">
      <Text>
        {p ? bar(done, total, barWidth) : bar(0, 1, barWidth)} {p ? percent(done, total) : preparing}
      </Text>
      <Text wrap="truncate-end">
        {formatBytes(done)} of {p ? formatBytes(total) : '?'}
        {' · '}
        {view.rate > 0 ? `${formatBytes(view.rate)}/s` : '… /s'}
        {' · ETA '}
        {view.etaMs === null ? '…' : formatDuration(view.etaMs)}
        {' · elapsed '}
        {formatDuration(view.elapsedMs)}
      </Text>
      <Text color={p?.damaged ? 'red' : undefined} bold={!!p?.damaged}>
        {damagedLabel}: {p?.damaged ?? 0}
        {p?.damaged ? ' (DAMAGED: listed at the end, the rest goes on)' : ''}
      </Text>
    </Box>
  );
}
