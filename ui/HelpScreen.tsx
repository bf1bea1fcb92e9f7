/** All keys, by screen ("?" opens it, Esc or "?" closes it). */
import { Box, Text } from 'ink';
import { useState } from 'react';
import { Frame } from './components.js';
import { useKeys, useSession } from './hooks.js';

type Section = [string, [string, string][]];

export function helpSections(caps: { scrub: boolean; remove: boolean; protect: boolean; tags: boolean; mount?: boolean }): Section[] {
  return [
    [
      'Everywhere',
      [
        ['? F1', 'this help (? not while typing text)'],
        ['F10', 'quit (a running restore is stopped safely first)'],
        ['q', 'quit (not while typing text; asks first while a restore runs)'],
        ['ctrl-c', 'quit; while a restore or scrub runs: stop it safely'],
        ['Esc', 'back / cancel'],
      ],
    ],
    [
      'Versions',
      [
        ['↑ ↓ j k PgUp PgDn Home End g G', 'select a version'],
        ['Enter', 'restore the selected version'],
        ['/', 'filter: type words (name, id, tag, date, "invalid"); Enter keeps it, Esc clears'],
        ...(caps.scrub
          ? ([
              ['s', 'scrub the selected version'],
              ['S', 'scrub the whole repository'],
            ] as [string, string][])
          : []),
        ...(caps.protect ? ([['p', 'protect / unprotect the selected version (protected ones cannot be removed)']] as [string, string][]) : []),
        ...(caps.tags ? ([['t', 'add or remove tags of the selected version']] as [string, string][]) : []),
        ...(caps.mount ? ([['m', 'mount the selected version read-only as files (root; u unmounts)']] as [string, string][]) : []),
        ...(caps.remove ? ([['x', 'remove the selected version (type its id to confirm)']] as [string, string][]) : []),
        ['R', 'reload the list'],
      ],
    ],
    [
      'Restore',
      [
        ['Tab', 'switch between typing a file path and choosing a block device; on the check step of an INVALID version: fill damaged blocks from another version'],
        ['Enter', 'check the path / choose the device, then start'],
        ['r', 'rescan devices; on the check step or after a stop: resume'],
        ['o', 'start an interrupted restore over'],
        ['Esc', 'during a restore: stop safely (it can be resumed later)'],
      ],
    ],
    [
      'Markers',
      [
        ['valid', 'every block verified when last checked'],
        ['INVALID', 'some blocks are damaged; the rest can be restored'],
        ['incomplete', 'the backup was interrupted; cannot be restored'],
        ['protected', 'cannot be removed until unprotected'],
      ],
    ],
  ];
}

export function HelpScreen({ onClose }: { onClose: () => void }) {
  const { backend, size } = useSession();
  const [scroll, setScroll] = useState(0);
  const lines: { title?: string; key?: string; text?: string }[] = [];
  for (const [title, entries] of helpSections({ scrub: !!backend.scrub, remove: !!backend.remove, protect: !!backend.setProtected, tags: !!backend.addTag, mount: !!backend.mount })) {
    lines.push({ title });
    for (const [key, text] of entries) lines.push({ key, text });
  }
  const room = Math.max(3, size.rows - 5);
  const maxScroll = Math.max(0, lines.length - room);
  useKeys((input, key) => {
    if (key.escape || input === '?' || input === 'q' || key.return) return onClose();
    if (key.downArrow || key.pageDown) setScroll((s) => Math.min(maxScroll, s + (key.pageDown ? room : 1)));
    if (key.upArrow || key.pageUp) setScroll((s) => Math.max(0, s - (key.pageUp ? room : 1)));
  });
  return (
    <Frame title="blocksafe · help" right="keys" keys={[['Esc', 'close help'], ...(maxScroll > 0 ? ([['↑↓', 'scroll']] as [string, string][]) : [])]}>
      <Box flexDirection="column">
        {lines.slice(scroll, scroll + room).map((l, i) =>
          l.title ? (
            <Text key={i} bold color="blue">
              {l.title}
            </Text>
          ) : (
            <Text key={i} wrap="truncate-end">
              {'  '}
              <Text bold>{l.key!.padEnd(24)}</Text>
              {l.text}
            </Text>
          ),
        )}
      </Box>
    </Frame>
  );
}
