/** Removing a version, confirmed by typing its id (removeVersion of the engine; protected ones are refused). */
import { Box, Text } from 'ink';
import { useState } from 'react';
import { errorText, type VersionRecord } from './backend.js';
import { Frame, TextInput } from './components.js';
import { formatBytes, longDate, statusWords } from './format.js';
import { useKeys, useSession } from './hooks.js';

export function RemoveScreen({ version, onExit }: { version: VersionRecord; onExit: (notice: string | null) => void }) {
  const { backend, active, log } = useSession();
  const [typed, setTyped] = useState('');
  const [busy, setBusy] = useState(false);
  // Refused before anything is typed (protected, too young): the rule of the repository, said at once.
  const [refusal] = useState(() => backend.removalRefusal?.(version) ?? null);
  const [error, setError] = useState<string | null>(refusal);
  const others = backend.listVersions().filter((x) => x.name === version.name && x.id !== version.id);

  const confirm = (typed: string) => {
    const remove = backend.remove;
    if (!remove || busy) return;
    if (refusal) return setError(refusal);
    if (typed.trim() !== version.id) {
      return setError(typed ? `You typed "${typed}", not "${version.id}"; nothing was removed.` : `Type ${version.id} and press Enter to remove it, or Esc to keep it.`);
    }
    setBusy(true);
    setError(null);
    remove(version).then(
      () => {
        log(`Removed version ${version.id} (${version.name}, ${longDate(version.date)}).`);
        onExit(`Removed version ${version.id} (${version.name}). Its space is freed by the next "blocksafe cleanup".`);
      },
      (err) => {
        setBusy(false);
        setError(errorText(err));
      },
    );
  };

  useKeys(
    (_input, key) => {
      if (busy) return;
      if (key.escape) return onExit(null);
    },
    { isActive: active },
  );

  return (
    <Frame
      title="blocksafe · remove a version"
      right={backend.summary.location}
      keys={
        refusal
          ? [
              ['Esc', 'go back'],
              ['ctrl-c', 'quit'],
            ]
          : [
              ['Enter', 'remove after typing the id'],
              ['Esc', 'keep it, go back'],
              ['ctrl-c', 'quit'],
            ]
      }
      error={error}
    >
      <Box flexDirection="column">
        <Text bold color="yellow">
          Remove this version from the repository?
        </Text>
        <Text> </Text>
        <Text wrap="truncate-end">
          {'  '}
          <Text bold>{version.id}</Text> · {version.name} · {longDate(version.date)} · {formatBytes(version.size)} · {statusWords(version).join(', ')}
          {version.tags.length ? ` · tags ${version.tags.join(', ')}` : ''}
        </Text>
        <Text> </Text>
        <Text wrap="wrap">It can no longer be restored afterwards. Blocks other versions share stay; the rest is freed by the next cleanup.</Text>
        {others.length === 0 ? (
          <Text color="red" bold wrap="wrap">
            {`This is the ONLY version of ${version.name}: after removing it, ${version.name} cannot be restored at all.`}
          </Text>
        ) : null}
        <Text> </Text>
        {refusal ? (
          <Text wrap="wrap">It cannot be removed now (see the error below); press Esc to go back.</Text>
        ) : (
          <Box flexDirection="column">
            <Text>
              To remove it, type its id <Text bold inverse>{` ${version.id} `}</Text> and press Enter:
            </Text>
            <Text>
              {'> '}
              <TextInput value={typed} onChange={setTyped} onSubmit={confirm} active={active && !busy} />
            </Text>
          </Box>
        )}
        {busy ? <Text color="cyan">Removing…</Text> : null}
      </Box>
    </Frame>
  );
}
