/**
 * The main screen: versions grouped by volume name (newest first in each group), a filter, and a detail
 * pane with the selected version's statistics and block counts.
 */
import { Box, Text } from 'ink';
import { useEffect, useMemo, useRef, useState, type ReactNode } from 'react';
import type { VersionRecord, VersionUsage } from './backend.js';
import { errorText } from './backend.js';
import { Frame, frameBodyRows, TextInput, type KeyHint } from './components.js';
import { age, blocksOf, fit, plural, fitRight, formatBytes, formatDuration, longDate, shortDate, statusColor, statusWords } from './format.js';
import { useKeys, useSession } from './hooks.js';

export type ListLine = { kind: 'group'; name: string; count: number; shown: number } | { kind: 'version'; v: VersionRecord; newestValid?: boolean };

/**
 * How dates are shown in the list: the UTC offset once in the header when every version has the same one
 * (else on each row), and seconds where several versions share a minute (else they look identical).
 */
export interface DateStyle {
  offset: string | null;
  withSeconds: Set<string>;
}

export function dateStyle(versions: VersionRecord[]): DateStyle {
  const offsets = new Set(versions.map((v) => longDate(v.date).slice(20)));
  const minutes = new Map<string, number>();
  for (const v of versions) {
    const m = longDate(v.date).slice(0, 16);
    minutes.set(m, (minutes.get(m) ?? 0) + 1);
  }
  return { offset: offsets.size === 1 ? [...offsets][0]! : null, withSeconds: new Set([...minutes].filter(([, n]) => n > 1).map(([m]) => m)) };
}

function rowDate(iso: string, style: DateStyle): string {
  const full = longDate(iso); // "2026-11-27 03:12:45 +01:00"
  const minute = full.slice(0, 16);
  const time = style.withSeconds.has(minute) ? full.slice(0, 19) : minute;
  return style.offset ? time : `${time} ${full.slice(20)}`;
}

/**
 * Every space-separated word of the filter must occur in the version's id, name, date, tags or snapshot, or
 * be one of its status words exactly ("valid" does not match INVALID).
 */
export function matchesFilter(v: VersionRecord, filter: string): boolean {
  const words = filter.toLowerCase().split(/\s+/).filter(Boolean);
  if (words.length === 0) return true;
  const hay = [v.id, v.name, v.snapshot_name, shortDate(v.date), ...v.tags].join(' ').toLowerCase();
  const status = statusWords(v).map((w) => w.toLowerCase());
  return words.every((w) => status.includes(w) || hay.includes(w));
}

/** Groups by volume name (names in alphabetical order), keeping the newest-first order inside each group. */
export function groupLines(versions: VersionRecord[], filter: string): ListLine[] {
  const groups = new Map<string, { all: number; shown: VersionRecord[] }>();
  for (const v of versions) {
    let g = groups.get(v.name);
    if (!g) groups.set(v.name, (g = { all: 0, shown: [] }));
    g.all++;
    if (matchesFilter(v, filter)) g.shown.push(v);
  }
  const lines: ListLine[] = [];
  for (const name of [...groups.keys()].sort((a, b) => a.localeCompare(b))) {
    const g = groups.get(name)!;
    if (g.shown.length === 0) continue;
    g.shown.sort((a, b) => b.date.localeCompare(a.date) || a.id.localeCompare(b.id));
    lines.push({ kind: 'group', name, count: g.all, shown: g.shown.length });
    // The version most people want on the restore day: the newest one that is complete and valid.
    const newest = versions.filter((v) => v.name === name && v.complete && v.valid).sort((a, b) => b.date.localeCompare(a.date))[0];
    for (const v of g.shown) lines.push({ kind: 'version', v, newestValid: v === newest });
  }
  return lines;
}

interface Columns {
  date: number;
  age: number;
  size: number;
  stored: number;
}

function columnsFor(width: number, style: DateStyle): Columns {
  const date = (style.withSeconds.size ? 19 : 16) + (style.offset ? 0 : 7);
  return { date: Math.max(date, style.offset ? 20 : 17), age: 7, size: 9, stored: width >= 100 ? 10 : 0 };
}

function header(width: number, style: DateStyle): string {
  const c = columnsFor(width, style);
  let s = `  ${fit('id', 8)} ${fit(style.offset ? `date (UTC${style.offset})` : 'date (local time)', c.date)} ${fitRight('age', c.age)} ${fitRight('size', c.size)}`;
  if (c.stored) s += ` ${fitRight('new data', c.stored)}`;
  return s + '  status / tags';
}

function VersionRow({ v, selected, width, style, newestValid, damaged }: { v: VersionRecord; selected: boolean; width: number; style: DateStyle; newestValid: boolean; damaged?: number }) {
  const c = columnsFor(width, style);
  let left = `${selected ? '>' : ' '} ${fit(v.id, 8)} ${fit(rowDate(v.date, style), c.date)} ${fitRight(age(v.date), c.age)} ${fitRight(formatBytes(v.size), c.size)}`;
  // "new data": what this backup added to the store (stored bytes), known without reading anything.
  if (c.stored) left += ` ${fitRight(v.complete ? formatBytes(v.stats.bytes_written) : '-', c.stored)}`;
  const words = statusWords(v);
  return (
    <Box width={width} height={1} overflow="hidden">
      <Text inverse={selected} bold={selected} wrap="truncate-end">
        {left}
        {'  '}
        {words.map((w, i) => (
          <Text key={w} color={statusColor(w)} bold={w === 'INVALID'}>
            {i > 0 ? ' ' : ''}
            {w}
          </Text>
        ))}
        {newestValid ? <Text dimColor={!selected}> (newest valid)</Text> : null}
        {damaged !== undefined && !v.valid ? <Text color="red">{` (${plural(damaged, 'block')} of ${blocksOf(v)} damaged)`}</Text> : null}
        {v.tags.length ? `  ${v.tags.join(',')}` : ''}
      </Text>
    </Box>
  );
}

/**
 * Which lines of the list are shown in `rows` rows so that the selected line is always one of them. When the
 * list scrolls, the last row says how many versions are below, and a first row whose group header scrolled
 * away shows that header instead (so the volume name stays in view).
 */
export function listWindow(lines: ListLine[], sel: number, rows: number, previousOffset: number): { offset: number; content: number; sticky: boolean; moreBelow: number } {
  const scrolls = lines.length > rows;
  const content = Math.max(1, scrolls ? rows - 1 : rows);
  let offset = previousOffset;
  // The selected line must not sit under a sticky header (row 0 when a version starts the window).
  const firstShown = (o: number) => o + (o > 0 && lines[o]?.kind === 'version' && content > 1 ? 1 : 0);
  if (sel < firstShown(offset)) offset = Math.max(0, sel - 1);
  if (sel > offset + content - 1) offset = sel - content + 1;
  offset = Math.max(0, Math.min(offset, Math.max(0, lines.length - content)));
  if (sel < firstShown(offset)) offset = Math.max(0, sel - 1);
  const sticky = offset > 0 && lines[offset]?.kind === 'version' && content > 1;
  const moreBelow = lines.slice(offset + content).filter((l) => l.kind === 'version').length;
  return { offset, content, sticky, moreBelow };
}

function GroupHeader({ name, count, shown, width, note }: { name: string; count: number; shown: number; width: number; note?: string }) {
  return (
    <Box width={width} height={1} overflow="hidden">
      <Text bold color="blue" wrap="truncate-end">
        {`== ${name} `}
        <Text dimColor>({shown === count ? `${count} version${count === 1 ? '' : 's'}` : `${shown} of ${count} versions match`})</Text>
        {note ? <Text dimColor>{note}</Text> : null}
      </Text>
    </Box>
  );
}

/** The list itself: `height` lines, scrolled so the selected version is always visible. */
export function VersionList({
  lines,
  selectedId,
  width,
  height,
  style,
  damage = new Map(),
}: {
  lines: ListLine[];
  selectedId: string | null;
  width: number;
  height: number;
  style: DateStyle;
  /** Damaged blocks of INVALID versions, as far as counted. */
  damage?: Map<string, number>;
}) {
  const offsetRef = useRef(0);
  const sel = Math.max(
    0,
    lines.findIndex((l) => l.kind === 'version' && l.v.id === selectedId),
  );
  const rows = Math.max(1, height);
  const win = listWindow(lines, sel, rows, offsetRef.current);
  offsetRef.current = win.offset;
  const visible = lines.slice(win.offset, win.offset + win.content);
  const groupOf = (i: number) => {
    for (let j = i; j >= 0; j--) {
      const l = lines[j];
      if (l?.kind === 'group') return l;
    }
    return null;
  };
  return (
    <Box flexDirection="column" width={width} height={rows} overflow="hidden">
      {visible.map((l, i) => {
        if (i === 0 && win.sticky) {
          const g = groupOf(win.offset);
          if (g) return <GroupHeader key={`sticky:${g.name}`} name={g.name} count={g.count} shown={g.shown} width={width} note="  (continued)" />;
        }
        return l.kind === 'group' ? (
          <GroupHeader key={`g:${l.name}`} name={l.name} count={l.count} shown={l.shown} width={width} />
        ) : (
          <VersionRow key={l.v.id} v={l.v} selected={l.v.id === selectedId} width={width} style={style} newestValid={!!l.newestValid} damaged={damage.get(l.v.id)} />
        );
      })}
      {lines.length > rows ? (
        <Box width={width} height={1} overflow="hidden">
          <Text dimColor wrap="truncate-end">
            {win.moreBelow > 0 ? `   ↓ ${win.moreBelow} more below` : '   (end of the list)'}
          </Text>
        </Box>
      ) : null}
    </Box>
  );
}

type UsageState = { id: string; usage?: VersionUsage; error?: string } | null;

/** Statistics and block counts of one version. */
export function VersionDetail({ v, usage, width, height }: { v: VersionRecord | null; usage: UsageState; width: number; height: number }) {
  if (!v) {
    return (
      <Box width={width} height={height}>
        <Text dimColor>No version selected.</Text>
      </Box>
    );
  }
  const s = v.stats;
  const words = statusWords(v);
  const stored =
    usage?.id !== v.id
      ? 'counting…'
      : usage.error
        ? `unknown (${usage.error})`
        : usage.usage
          ? `${formatBytes(usage.usage.storedBytes)} in ${plural(usage.usage.blocks, 'distinct block')} (shared ones included), ` +
            (usage.usage.damagedBlocks ? `${usage.usage.damagedBlocks} DAMAGED` : 'none damaged')
          : 'counting…';
  const rows: [string, ReactNode][] = [
    [
      'Version',
      <Text>
        <Text bold>{v.id}</Text> · {v.name} · {longDate(v.date)} ({age(v.date)} ago)
      </Text>,
    ],
    ['Size', `${formatBytes(v.size)} = ${plural(blocksOf(v), 'block')} of ${formatBytes(v.block_size)}`],
    [
      'Status',
      <Text>
        {words.map((w, i) => (
          <Text key={w} color={statusColor(w)} bold={w === 'INVALID'}>
            {i > 0 ? ', ' : ''}
            {w}
          </Text>
        ))}
        {!v.complete ? ` (${v.blocks_done} of ${plural(blocksOf(v), 'block')} saved; cannot be restored)` : ''}
        {` · expires ${v.expire ? longDate(v.expire) : 'never'} · tags ${v.tags.length ? v.tags.join(', ') : 'none'}`}
      </Text>,
    ],
    ['Stored', stored],
    [
      'Blocks',
      `${s.blocks_read} read, ${s.blocks_written} new (${formatBytes(s.bytes_written)} stored), ${s.blocks_deduplicated} dedup, ` +
        `${s.blocks_sparse} zero, ${s.blocks_referenced} unchanged; backup took ${formatDuration(s.duration_ms)}`,
    ],
    ['Source', `${v.source || '?'}${v.snapshot_name ? ` · snapshot ${v.snapshot_name}` : ''} · ${v.base ? `based on ${v.base}` : 'full backup'}`],
  ];
  return (
    <Box flexDirection="column" width={width} height={height} overflow="hidden">
      {rows.map(([label, value]) => (
        <Box key={label} width={width}>
          <Box width={8} flexShrink={0}>
            <Text dimColor>{label}</Text>
          </Box>
          <Box width={width - 8}>
            <Text wrap={width >= 60 && height > rows.length ? 'wrap' : 'truncate-end'}>{value}</Text>
          </Box>
        </Box>
      ))}
    </Box>
  );
}

export type ListAction = { kind: 'restore' | 'scrub' | 'remove' | 'tags' | 'mount'; version: VersionRecord } | { kind: 'scrub-all' };

/** The versions screen: list + filter + detail, and the keys that start the other screens. */
export function VersionsScreen({ onAction, initialSelected, notice }: { onAction: (a: ListAction) => void; initialSelected?: string | null; notice?: string | null }) {
  const { backend, size, active, quit, openHelp, log } = useSession();
  // Reading the index can fail (a damaged index, a disk gone): that is an error line, not a crash.
  const read = (): { list: VersionRecord[]; error: string | null } => {
    try {
      return { list: backend.listVersions(), error: null };
    } catch (err) {
      return { list: [], error: `Could not read the versions: ${errorText(err)}` };
    }
  };
  const [first] = useState(read);
  const [versions, setVersionList] = useState<VersionRecord[]>(first.list);
  const [filter, setFilter] = useState('');
  const [filtering, setFiltering] = useState(false);
  const [selectedId, setSelectedId] = useState<string | null>(initialSelected ?? null);
  const [error, setError] = useState<string | null>(first.error);
  const reload = () => {
    const r = read();
    setVersionList(r.list);
    setError(r.error);
  };
  const [usage, setUsage] = useState<UsageState>(null);
  const [localNotice, setLocalNotice] = useState<string | null>(null);
  // A notice (what was just done) stays until the next key, so it never describes an older state.
  const [noticeFresh, setNoticeFresh] = useState(true);
  const [busy, setBusy] = useState(false);
  // The age column moves on by itself (a render every 30 s), not only when a key is pressed.
  const [, setTick] = useState(0);
  useEffect(() => {
    const timer = setInterval(() => setTick((n) => n + 1), 30_000);
    timer.unref?.();
    return () => clearInterval(timer);
  }, []);

  const lines = useMemo(() => groupLines(versions, filter), [versions, filter]);
  const style = useMemo(() => dateStyle(versions), [versions]);
  // How much of each INVALID version is damaged, counted in the background from their block maps (INVALID
  // versions are few), so the list helps choose between them.
  const [damage, setDamage] = useState<Map<string, number>>(new Map());
  useEffect(() => {
    const ctl = new AbortController();
    void (async () => {
      for (const v of versions.filter((x) => !x.valid && x.complete)) {
        try {
          const u = await backend.versionUsage(v, ctl.signal);
          if (ctl.signal.aborted) return;
          setDamage((m) => new Map(m).set(v.id, u.damagedBlocks));
        } catch {
          if (ctl.signal.aborted) return;
        }
      }
    })();
    return () => ctl.abort();
  }, [backend, versions]);
  const shown = useMemo(() => lines.flatMap((l) => (l.kind === 'version' ? [l.v] : [])), [lines]);
  const selected = shown.find((v) => v.id === selectedId) ?? shown[0] ?? null;

  // Stored size and damaged blocks of the selected version: counted in the background, after a short pause.
  useEffect(() => {
    if (!selected) return;
    const ctl = new AbortController();
    const timer = setTimeout(() => {
      backend.versionUsage(selected, ctl.signal).then(
        (u) => !ctl.signal.aborted && setUsage({ id: selected.id, usage: u }),
        (err) => !ctl.signal.aborted && setUsage({ id: selected.id, error: errorText(err) }),
      );
    }, 150);
    return () => {
      clearTimeout(timer);
      ctl.abort();
    };
  }, [backend, selected?.id]);

  const shownRef = useRef(shown);
  shownRef.current = shown;
  // From the newest state, not this render's: keys may come faster than renders.
  const move = (delta: number) => {
    setSelectedId((prev) => {
      const list = shownRef.current;
      if (list.length === 0) return prev;
      const i = Math.max(
        0,
        list.findIndex((v) => v.id === prev),
      );
      return list[Math.max(0, Math.min(list.length - 1, i + delta))]!.id;
    });
    setError(null);
  };

  const wide = size.columns >= 120;
  // The rows the frame really gives the body: a long error takes two or three lines (see Frame).
  const bodyHeight = frameBodyRows(size, error);
  const shownNotice = localNotice ?? (noticeFresh ? notice : null);
  const noticeLines = shownNotice ? 1 : 0;
  // Below the list: a separator and the details, which give way first when rows are short.
  const detailHeight = wide ? bodyHeight - 2 : Math.max(2, Math.min(size.rows >= 30 ? 8 : 6, bodyHeight - noticeLines - 2 - 1 - 4));
  const listWidth = wide ? size.columns - 48 : size.columns;
  const listHeight = Math.max(1, (wide ? bodyHeight - 2 : bodyHeight - 2 - detailHeight - 1) - noticeLines);
  const page = Math.max(1, listHeight - 2);

  useKeys(
    (input, key) => {
      setNoticeFresh(false);
      setLocalNotice(null);
      if (filtering) {
        if (key.escape) {
          setFilter('');
          setFiltering(false);
        } else if (key.return || key.tab) setFiltering(false);
        else if (key.upArrow) move(-1);
        else if (key.downArrow) move(1);
        return;
      }
      if (key.upArrow || input === 'k') return move(-1);
      if (key.downArrow || input === 'j') return move(1);
      if (key.pageUp) return move(-page);
      if (key.pageDown) return move(page);
      if (key.home || input === 'g') return move(-shown.length);
      if (key.end || input === 'G') return move(shown.length);
      if (key.escape) {
        setFilter('');
        setError(null);
        return;
      }
      if (key.return) {
        if (!selected) return setError('There is no version to restore.');
        if (!selected.complete) {
          return setError(`Version ${selected.id} is incomplete (its backup was interrupted) and cannot be restored; pick another version.`);
        }
        return onAction({ kind: 'restore', version: selected });
      }
      if (input === '/') {
        setFiltering(true);
        setError(null);
        return;
      }
      if (input === 'q') return quit();
      if (input === '?') return openHelp();
      if (input === 'R' || (key.ctrl && input === 'l')) {
        reload();
        return;
      }
      if (input === 's' && backend.scrub) {
        if (!selected) return setError('There is no version to scrub; press S to scrub the whole repository.');
        return onAction({ kind: 'scrub', version: selected });
      }
      if (input === 'S' && backend.scrub) return onAction({ kind: 'scrub-all' });
      if (input === 'p' && backend.setProtected && selected && !busy) {
        const on = !selected.protected;
        setBusy(true);
        setError(null);
        backend.setProtected(selected, on).then(
          () => {
            reload();
            setLocalNotice(on ? `Version ${selected.id} is now protected: it cannot be removed.` : `Version ${selected.id} is no longer protected.`);
            log(`${on ? 'Protected' : 'Unprotected'} version ${selected.id} (${selected.name}, ${longDate(selected.date)}).`);
            setBusy(false);
          },
          (err) => {
            setError(errorText(err));
            setBusy(false);
          },
        );
        return;
      }
      if (input === 't' && backend.addTag && selected) return onAction({ kind: 'tags', version: selected });
      if (input === 'm' && backend.mount && selected) {
        if (!selected.complete) return setError(`Version ${selected.id} is incomplete (its backup was interrupted) and cannot be mounted; pick another version.`);
        return onAction({ kind: 'mount', version: selected });
      }
      if ((input === 'x' || key.delete) && backend.remove) {
        if (!selected) return;
        if (selected.protected) return setError(`Version ${selected.id} is protected; it cannot be removed (unprotect it first). Nothing was removed.`);
        return onAction({ kind: 'remove', version: selected });
      }
    },
    { isActive: active },
  );

  const keys: KeyHint[] = filtering
    ? [
        ['Enter', 'keep filter'],
        ['Esc', 'clear filter'],
        ['↑↓', 'select'],
      ]
    : [
        ['↑↓', 'select'],
        ['Enter', 'restore'],
        ['/', 'filter'],
        ...(backend.scrub ? ([['s', 'scrub']] as KeyHint[]) : []),
        ...(backend.setProtected ? ([['p', selected?.protected ? 'unprotect' : 'protect']] as KeyHint[]) : []),
        ...(backend.addTag ? ([['t', 'tags']] as KeyHint[]) : []),
        ...(backend.mount ? ([['m', 'mount']] as KeyHint[]) : []),
        ...(backend.remove ? ([['x', 'remove']] as KeyHint[]) : []),
        ['?', 'help'],
        ['q', 'quit'],
      ];
  const names = new Set(versions.map((v) => v.name)).size;
  const right = `${versions.length} version${versions.length === 1 ? '' : 's'} of ${names} volume${names === 1 ? '' : 's'}`;

  const filterLine = (
    <Box width={listWidth} height={1} overflow="hidden">
      <Text wrap="truncate-end">
        <Text bold={filtering}>Filter: </Text>
        {filtering || filter ? (
          <TextInput value={filter} onChange={setFilter} active={active && filtering} onSubmit={() => setFiltering(false)} />
        ) : (
          <Text dimColor>press / and type a name, id, tag, date or status (e.g. invalid)</Text>
        )}
        {!filtering && filter ? <Text dimColor> ({shown.length} shown, Esc clears)</Text> : null}
      </Text>
    </Box>
  );

  const listBody =
    versions.length === 0 ? (
      <Text>This repository holds no versions yet. Back one up with: blocksafe backup SOURCE NAME</Text>
    ) : shown.length === 0 ? (
      <Text>No version matches "{filter}". Press Esc to clear the filter.</Text>
    ) : (
      <VersionList lines={lines} selectedId={selected?.id ?? null} width={listWidth} height={listHeight} style={style} damage={damage} />
    );

  const list = (
    <Box flexDirection="column" width={listWidth}>
      {filterLine}
      <Box width={listWidth} height={1} overflow="hidden">
        <Text dimColor wrap="truncate-end">
          {header(listWidth, style)}
        </Text>
      </Box>
      <Box height={listHeight} flexDirection="column">
        {listBody}
      </Box>
    </Box>
  );

  return (
    <Frame title={`blocksafe · ${backend.summary.location}`} right={right} keys={keys} error={error ?? undefined}>
      {shownNotice ? (
        <Text color="green" wrap="truncate-end">
          {shownNotice}
        </Text>
      ) : null}
      {wide ? (
        <Box flexDirection="row">
          {list}
          <Box flexDirection="column" marginLeft={2} width={46}>
            <Text bold>Details</Text>
            <VersionDetail v={selected} usage={usage} width={46} height={detailHeight} />
          </Box>
        </Box>
      ) : (
        <Box flexDirection="column">
          {list}
          <Text dimColor wrap="truncate-end">
            {`── details ${'─'.repeat(Math.max(0, size.columns - 11))}`}
          </Text>
          <VersionDetail v={selected} usage={usage} width={size.columns} height={detailHeight} />
        </Box>
      )}
    </Frame>
  );
}
