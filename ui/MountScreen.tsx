/**
 * The Mount action: the selected version mounted read-only as files (a `blocksafe mount` child process, see
 * ui/mountChild.ts) on a private temporary directory, its data file shown with how to loop-mount it; u
 * unmounts. Quitting the UI (q, F10, a closed terminal) unmounts first: the mount is a Job like a restore.
 */
import { Box, Text } from 'ink';
import { useEffect, useRef, useState } from 'react';
import { errorText, type MountedVersion, type VersionRecord } from './backend.js';
import { Frame, type KeyHint } from './components.js';
import { longDate } from './format.js';
import { useKeys, useSession } from './hooks.js';

type State = { kind: 'mounting' } | { kind: 'mounted'; m: MountedVersion; unmounting: boolean } | { kind: 'failed' };

export function MountScreen({ version, onExit }: { version: VersionRecord; onExit: (notice: string | null) => void }) {
  const { backend, active, quit, setJob, log } = useSession();
  const [state, setState] = useState<State>({ kind: 'mounting' });
  const [error, setError] = useState<string | null>(null);
  const mounted = useRef<MountedVersion | null>(null);
  // Asked to stop (Esc, quit) while the mount was still starting: unmount as soon as it is up.
  const stopWanted = useRef(false);
  const unmounting = useRef(false);
  const started = useRef(false);

  const unmount = () => {
    const m = mounted.current;
    if (!m) {
      stopWanted.current = true;
      return;
    }
    if (unmounting.current) return;
    unmounting.current = true;
    setError(null);
    setState({ kind: 'mounted', m, unmounting: true });
    m.unmount().then(
      () => {
        mounted.current = null;
        log(`Mounted version ${version.id} (${version.name}, ${longDate(version.date)}) on ${m.dir} and unmounted it.`);
        setJob(null);
        onExit(`Unmounted version ${version.id} from ${m.dir}.`);
      },
      (err) => {
        // Busy: still mounted; the next u detaches it lazily.
        unmounting.current = false;
        setState({ kind: 'mounted', m, unmounting: false });
        setError(errorText(err).replace('press Ctrl-C again', 'press u again'));
      },
    );
  };
  const unmountRef = useRef(unmount);
  unmountRef.current = unmount;

  useEffect(() => {
    const mount = backend.mount;
    if (started.current || !mount) return;
    started.current = true;
    setJob({ stop: () => unmountRef.current() });
    mount(version).then(
      (m) => {
        mounted.current = m;
        setState({ kind: 'mounted', m, unmounting: false });
        // Unmounted from outside (umount, the process killed): say so and go back.
        void m.ended.then((why) => {
          if (mounted.current !== m || unmounting.current) return;
          mounted.current = null;
          setJob(null);
          onExit(`The mount of version ${version.id} on ${m.dir} has ended${why ? `: ${why}` : '.'}`);
        });
        if (stopWanted.current) unmountRef.current();
      },
      (err) => {
        setJob(null);
        if (stopWanted.current) return onExit(null);
        setState({ kind: 'failed' });
        setError(errorText(err));
      },
    );
  }, []);

  useKeys(
    (input, key) => {
      if (state.kind === 'failed') {
        if (key.escape) onExit(null);
        else if (input === 'q') quit();
        return;
      }
      if (state.kind === 'mounting') {
        if (key.escape) unmount();
        return;
      }
      if (state.unmounting) return;
      if (input === 'u' || key.escape) return unmount();
      if (input === 'q') return quit();
    },
    { isActive: active },
  );

  const keys: KeyHint[] =
    state.kind === 'failed'
      ? [
          ['Esc', 'go back'],
          ['q', 'quit'],
        ]
      : state.kind === 'mounting' || state.unmounting
        ? [['Esc', 'cancel']]
        : [
            ['u', error ? 'unmount (detach lazily)' : 'unmount and go back'],
            ['q', 'unmount and quit'],
          ];

  return (
    <Frame title="blocksafe · mount a version" right={backend.summary.location} keys={keys} error={error}>
      <Box flexDirection="column">
        <Text wrap="truncate-end">
          <Text bold>{version.id}</Text> · {version.name} · {longDate(version.date)}
        </Text>
        <Text> </Text>
        {state.kind === 'mounting' ? (
          <Text color="cyan">Mounting it read-only as files…</Text>
        ) : state.kind === 'failed' ? (
          <Text wrap="wrap">It could not be mounted (the reason is below). Nothing was changed.</Text>
        ) : (
          <Box flexDirection="column">
            <Text color="green" bold>
              {state.unmounting ? 'Unmounting… (detached lazily, it ends once the files still open are closed)' : 'MOUNTED read-only. The disk image is the file:'}
            </Text>
            <Text> </Text>
            <Text wrap="wrap">
              {'  '}
              <Text bold>{state.m.data}</Text>
            </Text>
            <Text> </Text>
            <Text wrap="wrap">To get at its files, loop-mount it read-only (as root, in another terminal):</Text>
            <Text wrap="wrap">{`  mount -o loop,ro ${state.m.data} /mnt`}</Text>
            <Text wrap="wrap">A disk with partitions: losetup -r -P --show on the file, then mount a partition. A VM can also boot from it.</Text>
            <Text wrap="wrap">Unmount and detach those first, then press u here (quitting the UI unmounts too).</Text>
          </Box>
        )}
      </Box>
    </Frame>
  );
}
