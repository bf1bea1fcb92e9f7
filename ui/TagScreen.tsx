/** Tags of one version: type a tag to add it, or "-tag" to remove it (the engine's addTags / removeTags). */
import { Box, Text } from 'ink';
import { useState } from 'react';
import { errorText, type VersionRecord } from './backend.js';
import { Frame, TextInput } from './components.js';
import { longDate } from './format.js';
import { useKeys, useSession } from './hooks.js';

export function TagScreen({ version, onExit }: { version: VersionRecord; onExit: (notice: string | null) => void }) {
  const { backend, active, log } = useSession();
  const [tags, setTags] = useState(version.tags);
  const [text, setText] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [done, setDone] = useState<string[]>([]);

  const submit = (value: string) => {
    const input = value.trim();
    if (busy) return;
    if (!input) return onExit(done.length ? `Tags of ${version.id}: ${done.join('; ')}.` : null);
    const remove = input.startsWith('-');
    const tag = remove ? input.slice(1) : input;
    const op = remove ? backend.removeTag : backend.addTag;
    if (!op) return;
    if (remove && !tags.includes(tag)) return setError(`Version ${version.id} has no tag "${tag}".`);
    if (!remove && tags.includes(tag)) return setError(`Version ${version.id} has the tag "${tag}" already; nothing was changed.`);
    setBusy(true);
    setError(null);
    op(version, tag).then(
      () => {
        const now = backend.listVersions().find((v) => v.id === version.id);
        setTags(now?.tags ?? tags);
        setDone((d) => [...d, `${remove ? 'removed' : 'added'} ${tag}`]);
        log(`${remove ? 'Removed tag' : 'Added tag'} ${tag} ${remove ? 'from' : 'to'} version ${version.id} (${version.name}, ${longDate(version.date)}).`);
        setText('');
        setBusy(false);
      },
      (err) => {
        setError(errorText(err));
        setBusy(false);
      },
    );
  };

  useKeys(
    (_input, key) => {
      if (key.escape && !busy) onExit(done.length ? `Tags of ${version.id}: ${done.join('; ')}.` : null);
    },
    { isActive: active },
  );

  return (
    <Frame
      title="blocksafe · tags"
      right={backend.summary.location}
      keys={[
        ['Enter', 'add (or -tag: remove); empty: done'],
        ['Esc', 'done'],
        ['ctrl-c', 'quit'],
      ]}
      error={error}
    >
      <Box flexDirection="column">
        <Text wrap="truncate-end">
          Version <Text bold>{version.id}</Text> · {version.name} · {longDate(version.date)}
        </Text>
        <Text> </Text>
        <Text wrap="wrap">Tags now: {tags.length ? tags.join(', ') : 'none'}</Text>
        <Text> </Text>
        <Text>
          Tag to add (or -tag to remove): <TextInput value={text} onChange={setText} onSubmit={submit} active={active && !busy} />
        </Text>
        <Text dimColor wrap="wrap">
          Tags are letters, digits and . _ : @ + - ; b_daily, b_weekly and b_monthly are set by backups.
        </Text>
      </Box>
    </Frame>
  );
}
