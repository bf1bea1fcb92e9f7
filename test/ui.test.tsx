/**
 * Component tests of the Ink UI with ink-testing-library. They drive the screens key by key against a
 * small FAKE data layer (test/uiFake.ts), used only here; test/tui-tmux.test.ts runs the real command on a
 * real repository.
 */
import React from 'react';
import test from 'ava';
import { cleanup } from 'ink-testing-library';
import { App } from '../ui/App.js';
import { withoutCliHints, type Backend } from '../ui/backend.js';
import { dateStyle, groupLines, listWindow, matchesFilter } from '../ui/VersionList.js';
import { fakeBackend, fakeVersion, KEY, press, renderAt, VERSIONS, waitForFrame, waitUnmounted, type FakeOptions, type Rendered } from './uiFake.js';

void React; // the test files are compiled with the classic JSX runtime

const GiB = 2 ** 30;

// Unmount whatever a failed test left running (timers would keep the worker alive).
test.afterEach.always(() => cleanup());

async function start(opts: FakeOptions = {}, columns = 80, rows = 24): Promise<{ r: Rendered; backend: ReturnType<typeof fakeBackend>; logs: string[] }> {
  const backend = fakeBackend(opts);
  const logs: string[] = [];
  const r = await renderAt(<App connect={async () => backend} location="/media/usb/blocksafe" onLog={(l) => logs.push(l)} />, columns, rows);
  await waitForFrame(r, / versions? of /);
  return { r, backend, logs };
}

function lines(frame: string): string[] {
  return frame.split('\n');
}

test.serial('groupLines: groups by volume name in alphabetical order, newest first inside each group', (t) => {
  const out = groupLines(VERSIONS, '');
  t.deepEqual(
    out.map((l) => (l.kind === 'group' ? `== ${l.name}` : l.v.id)),
    ['== home', 'home0002', 'home0001', '== root', 'root0003', 'root0002', 'root0001'],
  );
  t.true(matchesFilter(VERSIONS[1]!, 'root invalid'));
  t.false(matchesFilter(VERSIONS[0]!, 'root invalid'));
  t.true(matchesFilter(VERSIONS[2]!, 'keep'));
});

test.serial('the list shows groups, local dates with offset, sizes and status WORDS; footer keys fit 80x24', async (t) => {
  const { r } = await start();
  const frame = r.lastFrame()!;
  const ls = lines(frame);
  t.true(ls.length <= 23, `at most 23 lines in a 24-line terminal, got ${ls.length}`);
  for (const l of ls) t.true(l.length <= 80, `line wider than 80 columns: "${l}"`);
  t.regex(frame, /== home \(2 versions\)/);
  t.regex(frame, /== root \(3 versions\)/);
  t.true(frame.indexOf('== home') < frame.indexOf('== root'));
  t.true(frame.indexOf('root0003') < frame.indexOf('root0002') && frame.indexOf('root0002') < frame.indexOf('root0001'));
  const row = (id: string) => ls.find((l) => l.includes(id) && !l.includes('Version'))!;
  // Every version has the same UTC offset: it is said once, in the header; rows show local date and time.
  t.regex(frame, /date \(UTC[+-]\d\d:\d\d\)/);
  t.regex(row('root0003'), /root0003 \d{4}-\d\d-\d\d \d\d:\d\d\s/);
  t.regex(row('root0003'), /20\.0 GiB\s+valid \(newest valid\)\s+b_daily/);
  t.notRegex(row('root0001'), /newest valid/);
  t.regex(row('root0002'), /INVALID/);
  t.regex(row('root0001'), /valid protected/);
  t.regex(row('home0002'), /\bincomplete\s*$/); // not "incomplete valid": it cannot be restored
  // The first version is selected (a marker, not only colour) and detailed below.
  t.regex(row('home0002'), /^> home0002/);
  t.regex(frame, /Version home0002 · home/);
  t.regex(frame, /Size\s+20\.0 GiB = 5120 blocks of 4\.00 MiB/);
  t.regex(frame, /Blocks\s+2560 read, 1280 new/);
  t.regex(frame, /q quit/);
  t.regex(frame, /\? help/);
  r.unmount();
});

test.serial('the detail pane follows the selection and shows stored size and damaged block counts', async (t) => {
  const { r } = await start();
  await press(r, KEY.down, KEY.down, KEY.down);
  const frame = await waitForFrame(r, 'Version root0002');
  t.regex(frame, /^> root0002/m);
  t.regex(await waitForFrame(r, /Stored\s+6\.67 GiB in 1000 distinct blocks.*2 DAMAGED/), /2 DAMAGED/);
  r.unmount();
});

test.serial('typing a filter narrows the list; Esc clears it', async (t) => {
  const { r } = await start();
  await press(r, '/');
  await press(r, 'h', 'o', 'm', 'e');
  let frame = await waitForFrame(r, 'Filter: home');
  t.false(frame.includes('root0003'));
  t.true(frame.includes('home0001'));
  await press(r, KEY.enter);
  // Letters now act as keys again, but the filter stays.
  frame = await waitForFrame(r, '2 shown');
  await press(r, KEY.esc);
  frame = await waitForFrame(r, 'root0003');
  t.true(frame.includes('press / and type'));
  // A filter word matches status words too.
  await press(r, '/', 'i', 'n', 'v', 'a', 'l', 'i', 'd', KEY.enter);
  frame = await waitForFrame(r, '1 shown');
  t.true(frame.includes('root0002'));
  t.false(frame.includes('root0003'));
  // "q" typed into the filter is text, not quit.
  await press(r, '/', 'q');
  frame = await waitForFrame(r, 'No version matches');
  t.true(frame.includes('No version matches'), '"q" in the filter did not quit');
  r.unmount();
});

test.serial('an incomplete version cannot be restored: an error line, no wizard', async (t) => {
  const { r } = await start();
  await press(r, KEY.enter);
  const frame = await waitForFrame(r, 'Error: Version home0002 is incomplete');
  t.false(frame.includes('Where should it be restored to?'));
  r.unmount();
});

test.serial('restore wizard: version → file path → summary → progress → result, without force', async (t) => {
  const { r, backend, logs } = await start({ stepMs: 15 });
  await press(r, KEY.down, KEY.enter);
  let frame = await waitForFrame(r, 'Where should it be restored to?');
  t.regex(frame, /\[2 Target\]/);
  t.regex(frame, /home0001 · home/);
  await press(r, ...'/work/home.img');
  await press(r, KEY.enter);
  frame = await waitForFrame(r, 'Check before restoring');
  t.regex(frame, /\[3 Check\]/);
  t.regex(frame, /A new file is created/);
  t.regex(frame, /Press Enter to start the restore/);
  await press(r, KEY.enter);
  frame = await waitForFrame(r, /Restoring home0001[\s\S]*ETA/);
  t.regex(frame, /\[4 Restore\]/);
  frame = await waitForFrame(r, 'DONE: the restore finished and every block was verified.');
  t.regex(frame, /\[5 Result\]/);
  t.deepEqual(backend.restores, [{ version: 'home0001', req: { target: '/work/home.img', force: false, resume: false } }]);
  t.regex(logs.join('\n'), /Restored version home0001 .* to \/work\/home\.img: 2\.00 GiB, every block verified/);
  await press(r, KEY.enter);
  frame = await waitForFrame(r, 'Restored home0001 to /work/home.img; every block verified.');
  t.regex(frame, /^> home0001/m);
  r.unmount();
});

test.serial('the device list shows mounted, busy and too-small devices but refuses to pick them', async (t) => {
  const { r, backend } = await start();
  await press(r, KEY.down, KEY.down, KEY.enter); // root0003, 20 GiB
  await waitForFrame(r, 'Where should it be restored to?');
  await press(r, KEY.tab);
  let frame = await waitForFrame(r, '/dev/sdb');
  const row = (name: string) => lines(frame).find((l) => l.includes(`/dev/${name}`))!;
  t.regex(row('sda'), /System SSD\s+NO: mounted on \//);
  t.regex(row('sdb'), /yes \(will be overwritten\)/);
  t.regex(row('sdc'), /NO: too small/);
  t.regex(row('sdd'), /NO: used as swap/);
  // The cursor starts on the first usable device; go up to the mounted one and try to choose it.
  t.regex(row('sdb'), /^\s*> \/dev\/sdb/);
  await press(r, KEY.up, KEY.enter);
  frame = await waitForFrame(r, 'Error: /dev/sda cannot be chosen: mounted on / (unmount it first).');
  t.regex(frame, /\[2 Target\]/);
  await press(r, KEY.down, KEY.down, KEY.enter);
  frame = await waitForFrame(r, 'Error: /dev/sdc cannot be chosen: too small');
  t.regex(frame, /\[2 Target\]/);
  await press(r, KEY.down, KEY.enter);
  await waitForFrame(r, 'Error: /dev/sdd cannot be chosen: used as swap');
  t.deepEqual(backend.restores, []);
  r.unmount();
});

test.serial('overwriting a device needs its name typed; a wrong name writes nothing, the right one forces', async (t) => {
  const { r, backend } = await start({ stepMs: 2 });
  await press(r, KEY.down, KEY.down, KEY.enter, KEY.tab);
  await waitForFrame(r, '/dev/sdb');
  await press(r, KEY.enter);
  let frame = await waitForFrame(r, 'Check before restoring');
  t.regex(frame, /ALL DATA on \/dev\/sdb is lost/);
  t.regex(frame, /type its name\s+sdb\s+and press Enter/);
  await press(r, KEY.enter);
  await waitForFrame(r, 'Error: Type sdb and press Enter');
  await press(r, 's', 'd', 'a', KEY.enter);
  frame = await waitForFrame(r, 'Error: You typed "sda", not "sdb": nothing was written.');
  t.deepEqual(backend.restores, []);
  await press(r, KEY.backspace, 'b', KEY.enter);
  await waitForFrame(r, 'DONE');
  t.deepEqual(backend.restores, [{ version: 'root0003', req: { target: '/dev/sdb', force: true, resume: false } }]);
  r.unmount();
});

test.serial('an existing non-empty file also needs the typed name; Enter arriving with the text is not lost', async (t) => {
  const { r, backend } = await start({ files: { '/work/old.img': 5 * GiB }, stepMs: 2 });
  await press(r, KEY.down, KEY.down, KEY.enter);
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('/work/old.img\r'); // typed fast: text and Enter in one read
  let frame = await waitForFrame(r, 'Check before restoring');
  t.regex(frame, /OVERWRITTEN/);
  t.regex(frame, /type its name\s+old\.img/);
  r.stdin.write('old.img\r');
  frame = await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: '/work/old.img', force: true, resume: false }],
  );
  r.unmount();
});

test.serial('a folder or refused target keeps the wizard on the target step with the reason', async (t) => {
  const { r, backend } = await start();
  await press(r, KEY.down, KEY.down, KEY.enter);
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('/work/\r');
  const frame = await waitForFrame(r, 'Error: /work/ is a folder');
  t.regex(frame, /\[2 Target\]/);
  r.stdin.write('\r');
  t.deepEqual(backend.restores, []);
  r.unmount();
});

test.serial('an interrupted restore of the same version is offered for resume', async (t) => {
  const { r, backend } = await start({ interrupted: { '/dev/sdb': { version: 'root0003', blocks_done: 1024 } }, stepMs: 2 });
  await press(r, KEY.down, KEY.down, KEY.enter, KEY.tab);
  await waitForFrame(r, '/dev/sdb');
  await press(r, KEY.enter);
  const frame = await waitForFrame(r, 'An interrupted restore of this version to this target exists');
  t.regex(frame, /it resumes at 20\.0 % \(1024 of 5120 blocks\)/);
  t.regex(frame, /r resume/);
  await press(r, 'r');
  await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: '/dev/sdb', force: false, resume: true }],
  );
  r.unmount();
});

test.serial('starting over instead of resuming needs the typed name', async (t) => {
  const { r, backend } = await start({ interrupted: { '/dev/sdb': { version: 'root0003', blocks_done: 10 } }, stepMs: 2 });
  await press(r, KEY.down, KEY.down, KEY.enter, KEY.tab);
  await waitForFrame(r, '/dev/sdb');
  await press(r, KEY.enter);
  await waitForFrame(r, 'An interrupted restore');
  await press(r, 'o');
  await waitForFrame(r, 'type its name');
  r.stdin.write('sdb\r');
  await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: '/dev/sdb', force: true, resume: false }],
  );
  r.unmount();
});

test.serial('Esc stops a running restore after confirmation; the result offers resume', async (t) => {
  const { r, backend, logs } = await start({ stepMs: 2, hold: true });
  await press(r, KEY.down, KEY.enter);
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('/work/x.img\r');
  await waitForFrame(r, 'Press Enter to start');
  await press(r, KEY.enter);
  await waitForFrame(r, /Restoring home0001[\s\S]*50\.0 %/);
  await press(r, KEY.esc);
  await waitForFrame(r, 'Stop the restore?');
  await press(r, 'n');
  await waitForFrame(r, 'Esc or ctrl-c stops safely');
  t.false(r.lastFrame()!.includes('Stop the restore?'));
  await press(r, KEY.esc);
  await waitForFrame(r, 'Stop the restore?');
  await press(r, 'y');
  let frame = await waitForFrame(r, 'STOPPED at');
  // The figure is the checkpoint (where a resume continues), and the step bar does not say "ok".
  t.regex(frame, /STOPPED at 50\.0 % \(256 of 512 blocks\)/);
  t.regex(frame, /4 Restore STOPPED/);
  t.notRegex(frame, /Restore ok/);
  t.regex(frame, /r resume/);
  t.regex(logs.join('\n'), /STOPPED at 50\.0 % .* blocksafe restore --resume home0001 \/work\/x\.img/);
  await press(r, 'r');
  frame = await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [
      { target: '/work/x.img', force: false, resume: false },
      { target: '/work/x.img', force: false, resume: true },
    ],
  );
  r.unmount();
});

test.serial('ctrl-c during a restore stops it (no quit in the middle of a write)', async (t) => {
  const { r } = await start({ stepMs: 2, hold: true });
  await press(r, KEY.down, KEY.enter);
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('/work/y.img\r');
  await waitForFrame(r, 'Press Enter to start');
  await press(r, KEY.enter);
  await waitForFrame(r, /Restoring home0001/);
  await press(r, KEY.ctrlC);
  t.true((await waitForFrame(r, 'STOPPED at')).includes('STOPPED at'));
  r.unmount();
});

test.serial('engine errors are one red "Error:" line, never a stack trace', async (t) => {
  const { r } = await start({ restoreError: 'Target /work/z.img: no space left on the device; free some space and retry.', stepMs: 2 });
  await press(r, KEY.down, KEY.enter);
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('/work/z.img\r');
  await waitForFrame(r, 'Press Enter to start');
  await press(r, KEY.enter);
  const frame = await waitForFrame(r, 'The restore did not finish.');
  t.regex(frame, /Error: Target \/work\/z\.img: no space left/);
  t.false(/\n\s+at .*:\d+:\d+/.test(frame), 'no stack trace');
  t.regex(frame, /r resume/); // it had written something before failing
  r.unmount();
});

test.serial('damaged ranges are listed in the result', async (t) => {
  const damaged = [{ offset: 8 * 2 ** 20, length: 4 * 2 ** 20, reason: 'block 0123… is damaged: authentication failed' }];
  const { r } = await start({ damaged, stepMs: 2 });
  await press(r, KEY.down, KEY.enter);
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('/work/d.img\r');
  await waitForFrame(r, 'Press Enter to start');
  await press(r, KEY.enter);
  const frame = await waitForFrame(r, 'FINISHED WITH DAMAGE');
  t.regex(frame, /DAMAGED offset 8388608 \(8\.00 MiB\), 4\.00 MiB: block 0123… is damaged/);
  r.unmount();
});

test.serial('the passphrase is asked inside the UI; a wrong one is reported and asked again', async (t) => {
  const backend = fakeBackend();
  const connect = async (ask: () => Promise<string>): Promise<Backend> => {
    const p = await ask();
    if (p !== 'secret') throw Object.assign(new Error("Wrong passphrase: it opens none of the repository's key slots."), { exitCode: 1 });
    return backend;
  };
  const r = await renderAt(<App connect={connect} location="/media/usb/blocksafe" />);
  await waitForFrame(r, 'This repository is encrypted.');
  r.stdin.write('nope');
  let frame = await waitForFrame(r, 'Passphrase: ****');
  t.false(frame.includes('nope'), 'the passphrase is never shown');
  await press(r, KEY.enter);
  frame = await waitForFrame(r, "Error: Wrong passphrase: it opens none of the repository's key slots.");
  r.stdin.write('secret\r');
  frame = await waitForFrame(r, 'versions of');
  t.regex(frame, /root0003/);
  r.unmount();
});

test.serial('a repository that cannot be opened shows the reason, and q quits', async (t) => {
  const connect = async (): Promise<Backend> => {
    throw Object.assign(new Error('No blocksafe repository at /nowhere (no blocksafe.json); check --repo or run "blocksafe init".'), { exitCode: 1 });
  };
  const r = await renderAt(<App connect={connect} location="/nowhere" />);
  const frame = await waitForFrame(r, 'Error: No blocksafe repository at /nowhere');
  t.regex(frame, /q quit/);
  await press(r, 'q');
  t.true(await waitUnmounted(r), 'the app exited');
});

test.serial('q on the list quits the app', async (t) => {
  const { r } = await start();
  await press(r, 'q');
  t.true(await waitUnmounted(r), 'the app exited');
});

test.serial('p protects and unprotects; t adds and removes tags (when the engine has them)', async (t) => {
  const { r } = await start({ withLifecycle: true, withRemove: true }, 100, 30);
  t.regex(r.lastFrame()!, /p protect/);
  await press(r, KEY.down, KEY.down, 'p'); // root0003
  let frame = await waitForFrame(r, 'Version root0003 is now protected');
  t.regex(frame, /root0003 .*valid protected/);
  // A protected version cannot be removed.
  await press(r, 'x');
  await waitForFrame(r, 'Error: Version root0003 is protected');
  await press(r, 'p');
  frame = await waitForFrame(r, 'Version root0003 is no longer protected');
  t.notRegex(frame, /> root0003 .*protected/);
  await waitForFrame(r, /Stored\s+6\.67 GiB/);
  await press(r, 't');
  await waitForFrame(r, 'Tags now: b_daily');
  r.stdin.write('offsite\r');
  await waitForFrame(r, 'Tags now: b_daily, offsite');
  r.stdin.write('bad tag!\r');
  await waitForFrame(r, 'Error: Invalid tag "bad tag!".');
  for (let i = 0; i < 8; i++) await press(r, KEY.backspace);
  r.stdin.write('-b_daily\r');
  await waitForFrame(r, 'Tags now: offsite');
  await press(r, KEY.esc);
  frame = await waitForFrame(r, 'Tags of root0003: added offsite; removed b_daily.');
  t.regex(frame, /root0003 .*valid \(newest valid\)\s+offsite/);
  r.unmount();
});

test.serial('? opens the help over the screen and Esc closes it', async (t) => {
  const { r } = await start({ withScrub: true, withRemove: true }, 100, 40);
  await press(r, '?');
  let frame = await waitForFrame(r, 'blocksafe · help');
  t.regex(frame, /Enter\s+restore the selected version/);
  t.regex(frame, /INVALID\s+some blocks are damaged/);
  await press(r, KEY.esc);
  frame = await waitForFrame(r, 'versions of');
  t.false(frame.includes('blocksafe · help'));
  r.unmount();
});

test.serial('scrub and remove keys exist only when the engine provides them', async (t) => {
  const without = await start();
  t.false(without.r.lastFrame()!.includes('s scrub'));
  t.false(without.r.lastFrame()!.includes('x remove'));
  await press(without.r, 's', 'x', KEY.down);
  // The next key is handled on the same list: s and x did nothing.
  t.true((await waitForFrame(without.r, /^> home0001/m)).includes('versions of'));
  without.r.unmount();

  const withBoth = await start({ withScrub: true, withRemove: true });
  t.true(withBoth.r.lastFrame()!.includes('s scrub'));
  t.true(withBoth.r.lastFrame()!.includes('x remove'));
  withBoth.r.unmount();
});

test.serial('scrub of the selected version shows its result with the INVALID versions highlighted by word', async (t) => {
  const { r } = await start({ withScrub: true }, 100, 30);
  await press(r, KEY.down, KEY.down, 's');
  let frame = await waitForFrame(r, 'Scrub: re-read stored blocks');
  t.regex(frame, /\(\*\) this version: root0003/);
  await press(r, KEY.enter);
  frame = await waitForFrame(r, 'DAMAGE FOUND');
  t.regex(frame, /INVALID root0003 \(root, .*\)\s+\(new\)/);
  r.unmount();
});

test.serial('remove asks for the typed id and refuses protected versions', async (t) => {
  const { r, backend } = await start({ withRemove: true });
  // root0001 is protected: refused right on the list.
  await press(r, KEY.down, KEY.down, KEY.down, KEY.down, 'x');
  await waitForFrame(r, 'Error: Version root0001 is protected');
  await press(r, KEY.up, 'x');
  await waitForFrame(r, 'Remove this version from the repository?');
  r.stdin.write('root\r');
  await waitForFrame(r, 'Error: You typed "root", not "root0002"; nothing was removed.');
  t.deepEqual(backend.removed, []);
  for (let i = 0; i < 4; i++) await press(r, KEY.backspace);
  r.stdin.write('root0002\r');
  const frame = await waitForFrame(r, 'Removed version root0002');
  t.false(frame.includes('> root0002'));
  t.deepEqual(backend.removed, ['root0002']);
  r.unmount();
});

test.serial('the layout adapts on resize: wide terminals get the details beside the list', async (t) => {
  const { r } = await start({}, 80, 24);
  t.true(r.lastFrame()!.includes('── details'));
  Object.defineProperty(r.stdout, 'columns', { value: 150, configurable: true });
  Object.defineProperty(r.stdout, 'rows', { value: 40, configurable: true });
  r.stdout.emit('resize');
  const frame = await waitForFrame(r, 'Details');
  t.false(frame.includes('── details'));
  t.regex(frame, /new data/); // the stored-data column appears when there is room
  t.true(lines(frame).length <= 39);
  r.unmount();
});

test.serial('a version bigger than every device still lists them with the reason', async (t) => {
  const huge = fakeVersion('huge0001', 'data', '2026-11-27T00:00:00.000Z', { size: 4096 * GiB });
  const { r } = await start({ versions: [huge] });
  await press(r, KEY.enter, KEY.tab);
  const frame = await waitForFrame(r, '/dev/sdb');
  t.regex(frame, /\/dev\/sdb .*NO: too small \(256 GiB < 4\.00 TiB\)/);
  await press(r, KEY.enter);
  await waitForFrame(r, /Error: \/dev\/\w+ cannot be chosen/);
  r.unmount();
});

test.serial('an index that cannot be read is an error line, not a crash or a stack trace', async (t) => {
  const backend = fakeBackend();
  backend.listVersions = () => {
    throw Object.assign(new Error('The index is damaged (MDB_CORRUPTED); run "blocksafe index rebuild".'), { exitCode: 1 });
  };
  const r = await renderAt(<App connect={async () => backend} location="/media/usb/blocksafe" />);
  const frame = await waitForFrame(r, 'Error: Could not read the versions: The index is damaged');
  t.false(/\n\s+at .*:\d+:\d+/.test(frame));
  await press(r, 'q');
  t.true(await waitUnmounted(r), 'the app exited');
});

test.serial('a bug in a screen is caught: one error line, q still quits', async (t) => {
  const backend = fakeBackend();
  backend.listVersions = () => [{ ...VERSIONS[0]!, tags: null as unknown as string[] }];
  const r = await renderAt(<App connect={async () => backend} location="/media/usb/blocksafe" />);
  const frame = await waitForFrame(r, 'Error: Unexpected problem:');
  t.false(/\n\s+at .*:\d+:\d+/.test(frame));
  await press(r, 'q');
  t.true(await waitUnmounted(r), 'the app exited');
});

/** 27 versions of one volume (as in the report: 27 versions at 100×30), the 20th protected. */
function manyVersions(): ReturnType<typeof fakeVersion>[] {
  return Array.from({ length: 27 }, (_, i) => {
    const day = String(27 - i).padStart(2, '0');
    return fakeVersion(`data00${String(27 - i).padStart(2, '0')}`, 'data', `2026-11-${day}T02:00:00.000Z`, { protected: i === 19, size: 2 * GiB });
  });
}

for (const [columns, rows] of [
  [100, 30],
  [80, 24],
] as const) {
  test.serial(`a long list at ${columns}x${rows} keeps the selected row visible when a two-line error appears`, async (t) => {
    const { r } = await start({ versions: manyVersions(), withRemove: true }, columns, rows);
    for (let i = 0; i < 19; i++) await press(r, 'j');
    let frame = await waitForFrame(r, /^> data0008/m);
    t.regex(frame, /↓ \d+ more below/);
    t.regex(frame, /== data \(27 versions\)\s+\(continued\)/, 'the group header stays in view when scrolled');
    await press(r, 'x');
    frame = await waitForFrame(r, 'Error: Version data0008 is protected');
    const ls = lines(frame);
    t.true(ls.length <= rows - 1, `at most ${rows - 1} lines, got ${ls.length}`);
    t.true(
      ls.some((l) => /^> data0008 /.test(l)),
      'the selected row is still shown',
    );
    t.true(ls.filter((l) => l.startsWith('Error:') || l.startsWith('unprotect')).length >= 1);
    // No row of the list went blank: the rows between the first and the last shown version are all versions.
    const first = ls.findIndex((l) => /^[ >] data00\d\d /.test(l));
    const last = ls.map((l) => /^[ >] data00\d\d /.test(l)).lastIndexOf(true);
    for (let i = first; i <= last; i++) t.regex(ls[i]!, /^[ >] data00\d\d /);
    // And moving on still shows the selection.
    await press(r, 'G');
    frame = await waitForFrame(r, /^> data0001/m);
    t.regex(frame, /end of the list/);
    await press(r, 'g');
    await waitForFrame(r, /^> data0027/m);
    r.unmount();
  });
}

test('listWindow: the selection is never under the sticky header nor below the window', (t) => {
  const versions = manyVersions();
  const ls = groupLines(versions, '');
  let offset = 0;
  for (const sel of [1, 5, 20, 27, 3, 1, 14, 2]) {
    const w = listWindow(ls, sel, 10, offset);
    offset = w.offset;
    t.true(sel >= w.offset + (w.sticky ? 1 : 0), `sel ${sel} below the sticky header at ${w.offset}`);
    t.true(sel < w.offset + w.content, `sel ${sel} inside the window ${w.offset}+${w.content}`);
    t.is(w.content, 9, 'one row is kept for "more below"');
  }
});

test.serial('the status filter matches words exactly: valid is not INVALID; incomplete is not valid', (t) => {
  const invalid = VERSIONS[1]!;
  const incomplete = VERSIONS[3]!;
  t.false(matchesFilter(invalid, 'valid'));
  t.true(matchesFilter(invalid, 'invalid'));
  t.true(matchesFilter(VERSIONS[0]!, 'valid'));
  t.false(matchesFilter(incomplete, 'valid'));
  t.true(matchesFilter(incomplete, 'incomplete'));
});

test.serial('F1 opens the help, j/k move, F10 quits; Esc and a key in one read are both handled', async (t) => {
  const { r } = await start();
  await press(r, 'j', 'j');
  await waitForFrame(r, /^> root0003/m);
  await press(r, 'k');
  await waitForFrame(r, /^> home0001/m);
  await press(r, '\u001BOP'); // F1
  await waitForFrame(r, 'blocksafe · help');
  await press(r, KEY.esc);
  await waitForFrame(r, 'versions of');
  // In the device list, Esc and "j" arriving together (a slow link): Esc leaves the wizard, j moves on the list.
  await press(r, KEY.enter, KEY.tab);
  await waitForFrame(r, /> \/dev\/sdb/);
  r.stdin.write('\u001Bj');
  const frame = await waitForFrame(r, /^> root0003/m);
  t.false(frame.includes('Where should it be restored to?'));
  await press(r, '\u001B[21~'); // F10
  t.true(await waitUnmounted(r), 'F10 quit');
});

test.serial('below 80x24 the UI says the terminal is too small and takes no keys but q', async (t) => {
  const { backend } = { backend: fakeBackend() };
  const r = await renderAt(<App connect={async () => backend} location="/media/usb/blocksafe" />, 70, 20);
  const frame = await waitForFrame(r, 'The terminal is 70×20; blocksafe ui needs at least 80×24.');
  for (const l of lines(frame)) t.true(l.length <= 70);
  await press(r, KEY.enter); // would open the restore wizard on a big terminal
  Object.defineProperty(r.stdout, 'columns', { value: 80, configurable: true });
  Object.defineProperty(r.stdout, 'rows', { value: 24, configurable: true });
  r.stdout.emit('resize');
  t.notRegex(await waitForFrame(r, 'versions of'), /Where should it be restored/);
  Object.defineProperty(r.stdout, 'columns', { value: 60, configurable: true });
  r.stdout.emit('resize');
  await waitForFrame(r, 'The terminal is 60×24');
  await press(r, 'q');
  t.true(await waitUnmounted(r), 'q quits');
});

test.serial('a device can be confirmed by its path too (/dev/sdb for sdb); Home/End move in the device list', async (t) => {
  const { r, backend } = await start({ stepMs: 2 });
  await press(r, KEY.down, KEY.down, KEY.enter, KEY.tab);
  await waitForFrame(r, /> \/dev\/sdb/);
  await press(r, 'G');
  await waitForFrame(r, /> \/dev\/sdd/);
  await press(r, 'g');
  await waitForFrame(r, /> \/dev\/sda/);
  await press(r, 'j', KEY.enter);
  await waitForFrame(r, 'type its name');
  r.stdin.write('/dev/sdb\r');
  await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: '/dev/sdb', force: true, resume: false }],
  );
  r.unmount();
});

test.serial('adding a tag the version has already is an error, not a second "added"', async (t) => {
  const { r } = await start({ withLifecycle: true });
  await press(r, KEY.down, KEY.down, 't'); // root0003, tagged b_daily
  await waitForFrame(r, 'Tags now: b_daily');
  r.stdin.write('b_daily\r');
  await waitForFrame(r, 'Error: Version root0003 has the tag "b_daily" already; nothing was changed.');
  await press(r, KEY.esc);
  const frame = await waitForFrame(r, 'versions of');
  t.notRegex(frame, /Tags of root0003: added/);
  r.unmount();
});

test.serial('the Check step says what is on the device; DONE gives the next steps and the same command for scripts', async (t) => {
  const { r } = await start({ stepMs: 2 }, 100, 30);
  await press(r, KEY.down, KEY.down, KEY.enter, KEY.tab);
  await waitForFrame(r, /> \/dev\/sdb/);
  await press(r, KEY.enter);
  let frame = await waitForFrame(r, 'Check before restoring');
  t.regex(frame, /Holds\s+an ext4 filesystem labelled "old-root" \(what is lost\)/);
  r.stdin.write('sdb\r');
  frame = await waitForFrame(r, 'DONE');
  t.regex(frame, /Next: fsck -n \/dev\/sdb checks a filesystem without changing it; mount -o ro \/dev\/sdb/);
  t.regex(frame, /The same from a script: blocksafe restore --repo \/media\/usb\/blocksafe --force root0003 \/dev\/sdb/);
  r.unmount();
});

test.serial('a notice is gone after the next key; engine hints for the command line are not shown in the UI', async (t) => {
  t.is(withoutCliHints('Target /x exists and is not empty (5 GiB); nothing was written. Use --force to overwrite it.'), 'Target /x exists and is not empty (5 GiB); nothing was written.');
  t.is(withoutCliHints('Version abc is incomplete; resume or repeat the backup.'), 'Version abc is incomplete; resume or repeat the backup.');
  const { r } = await start({ withLifecycle: true });
  await press(r, KEY.down, KEY.down, 'p');
  await waitForFrame(r, 'Version root0003 is now protected');
  await press(r, KEY.down);
  const frame = await waitForFrame(r, /^> root0002/m);
  t.false(frame.includes('is now protected'), 'the notice went with the next key');
  r.unmount();
});

test.serial('an INVALID version: damaged blocks are zeros by default, Tab chooses another version to fill them from', async (t) => {
  const { r, backend } = await start({ stepMs: 2 }, 100, 30);
  await press(r, KEY.down, KEY.down, KEY.down, KEY.enter); // root0002, INVALID
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('/work/r2.img\r');
  let frame = await waitForFrame(r, 'Check before restoring');
  t.regex(frame, /Damaged blocks: written as zeros\. Tab: fill them from another version\./);
  await press(r, KEY.tab);
  frame = await waitForFrame(r, /Damaged blocks: taken from version root0003 \(root, .*\) where it has them\s+intact, else zeros\./);
  await press(r, KEY.enter);
  await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: '/work/r2.img', force: false, resume: false, fillFrom: 'root0003' }],
  );
  r.unmount();
});

test.serial('dates: seconds where versions share a minute, not elsewhere', async (t) => {
  const a = fakeVersion('aaaa0001', 'a', '2026-11-27T02:00:05.000Z');
  const b = fakeVersion('aaaa0002', 'a', '2026-11-27T02:00:41.000Z');
  const c = fakeVersion('aaaa0003', 'a', '2026-11-27T03:10:00.000Z');
  const style = dateStyle([a, b, c]);
  t.is(style.withSeconds.size, 1, 'one shared minute');
  const { r } = await start({ versions: [a, b, c] });
  const frame = r.lastFrame()!;
  t.regex(frame, /aaaa0001 \d{4}-\d\d-\d\d \d\d:\d\d:05 /);
  t.regex(frame, /aaaa0002 \d{4}-\d\d-\d\d \d\d:\d\d:41 /);
  t.regex(frame, /aaaa0003 \d{4}-\d\d-\d\d \d\d:\d\d {4}/);
  r.unmount();
});

test.serial('remove: the minimum age refuses before the id is asked; removing the only version of a volume is warned about', async (t) => {
  const { r, backend } = await start({ withRemove: true, tooYoung: ['root0003'] });
  await press(r, KEY.down, KEY.down, 'x'); // root0003, too young
  let frame = await waitForFrame(r, 'Error: Version root0003 is only 1.0 days old (minimum age for removal: 7 days).');
  t.false(frame.includes('type its id'), 'no id is asked for a removal that would be refused');
  await press(r, KEY.esc);
  await waitForFrame(r, 'versions of');
  t.deepEqual(backend.removed, []);
  // home0001 is not the only one of home (home0002 exists): no warning; a volume with one version: a warning.
  const single = await start({ withRemove: true, versions: [fakeVersion('solo0001', 'solo', '2026-11-20T02:00:00.000Z')] });
  await press(single.r, 'x');
  frame = await waitForFrame(single.r, 'Remove this version from the repository?');
  t.regex(frame, /This is the ONLY version of solo: after removing it, solo cannot be restored at\s+all\./);
  single.r.unmount();
  r.unmount();
  t.is(
    withoutCliHints('Version v is only 0.2 days old (minimum age for removal: 7 days); use --force to remove it anyway. Nothing was removed.'),
    'Version v is only 0.2 days old (minimum age for removal: 7 days). Nothing was removed.',
  );
});

test.serial('a repository that does not open: r lets another path be typed, and the UI opens it', async (t) => {
  const backend = fakeBackend();
  const tried: string[] = [];
  const failing = async (): Promise<Backend> => {
    throw Object.assign(new Error('No blocksafe repository at /media/usbb (no blocksafe.json).'), { exitCode: 1 });
  };
  const fatal: boolean[] = [];
  const r = await renderAt(
    <App
      connect={failing}
      location="/media/usbb"
      onFatal={(f) => fatal.push(f)}
      relocate={(input) => {
        tried.push(input);
        return { location: input, connect: async () => backend };
      }}
    />,
  );
  await waitForFrame(r, 'Error: No blocksafe repository at /media/usbb');
  await press(r, 'r');
  await waitForFrame(r, 'Type the path of the repository');
  r.stdin.write('/media/usb/blocksafe\r');
  const frame = await waitForFrame(r, 'versions of');
  t.regex(frame, /blocksafe · \/media\/usb\/blocksafe/);
  t.deepEqual(tried, ['/media/usb/blocksafe']);
  t.deepEqual(fatal, [true, false], 'the exit code is no longer that of a failed opening');
  r.unmount();
});

test.serial('the list says how much of an INVALID version is damaged', async (t) => {
  const { r } = await start({}, 100, 30);
  const frame = await waitForFrame(r, /root0002 .*INVALID \(2 blocks of 5120 damaged\)/);
  t.notRegex(frame, /root0003 .*damaged/);
  r.unmount();
});

test.serial('m mounts the selected version: the data path and loop-mount hint are shown, u unmounts; errors are one line', async (t) => {
  const { r, backend, logs } = await start({ withMount: true, unmountBusy: 'cannot unmount yet (target is busy); close the files in it.' }, 100, 30);
  t.regex(r.lastFrame()!, /m mount/);
  // home0002 (selected first) is incomplete: refused on the list, nothing mounted.
  await press(r, 'm');
  await waitForFrame(r, 'Error: Version home0002 is incomplete');
  t.deepEqual(backend.mounts, []);
  await press(r, KEY.down, 'm'); // home0001
  let frame = await waitForFrame(r, 'MOUNTED read-only');
  t.regex(frame.replace(/\s+/g, ' '), /\/tmp\/blocksafe-mount-home0001\/by_id\/home0001\/data/);
  t.regex(frame.replace(/\s+/g, ' '), /mount -o loop,ro \/tmp\/blocksafe-mount-home0001\/by_id\/home0001\/data/);
  t.deepEqual(backend.mounts, ['home0001']);
  // Busy: the reason is shown, it stays mounted; u again unmounts.
  await press(r, 'u');
  frame = await waitForFrame(r, 'Error: cannot unmount yet (target is busy)');
  t.regex(frame, /MOUNTED read-only/);
  await press(r, 'u');
  frame = await waitForFrame(r, 'Unmounted version home0001 from /tmp/blocksafe-mount-home0001.');
  t.regex(frame, /versions of/);
  t.deepEqual(backend.unmounts, ['home0001', 'home0001']);
  t.true(logs.some((l) => l.includes('Mounted version home0001') && l.includes('unmounted it')));
  r.unmount();

  // Quitting while mounted unmounts first, then the app ends.
  const q = await start({ withMount: true });
  await press(q.r, KEY.down, 'm');
  await waitForFrame(q.r, 'MOUNTED read-only');
  await press(q.r, 'q');
  t.true(await waitUnmounted(q.r), 'the app exited');
  t.deepEqual(q.backend.unmounts, ['home0001']);

  // The child's one-line error (not root) is shown as it is; Esc goes back.
  const e = await start({ withMount: true, mountError: 'blocksafe mount needs root (it mounts a FUSE file system with mount(8)); run it as root.' });
  await press(e.r, KEY.down, 'm');
  frame = await waitForFrame(e.r, 'Error: blocksafe mount needs root');
  t.regex(frame, /could not be mounted/);
  await press(e.r, KEY.esc);
  await waitForFrame(e.r, 'versions of');
  e.r.unmount();

  // Without the capability there is no m key.
  const none = await start();
  t.false(none.r.lastFrame()!.includes('m mount'));
  none.r.unmount();
});

test.serial('rbd:// typed as the target: a new image is created thin, no confirmation; DONE says how to look at it', async (t) => {
  const { r, backend } = await start({ stepMs: 2 }, 100, 30);
  await press(r, KEY.down, KEY.enter); // home0001, 2 GiB
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('rbd://rbd/vm-101-disk-0\r');
  let frame = await waitForFrame(r, 'Check before restoring');
  t.regex(frame, /Target\s+rbd:\/\/rbd\/vm-101-disk-0 \(a new RBD image in pool rbd\)/);
  t.regex(frame, /A new RBD image of 2\.00 GiB \(2147483648 bytes\) is created, thin/);
  t.regex(frame, /Press Enter to start the restore/);
  t.false(frame.includes('type its name'));
  await press(r, KEY.enter);
  frame = await waitForFrame(r, 'DONE');
  t.regex(frame, /Next: rbd map --read-only rbd\/vm-101-disk-0 attaches the image read-only/);
  t.regex(frame, /The same from a script: blocksafe restore --repo \/media\/usb\/blocksafe home0001\s+rbd:\/\/rbd\/vm-101-disk-0/);
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: 'rbd://rbd/vm-101-disk-0', force: false, resume: false }],
  );
  r.unmount();
});

test.serial('rbd:// to an existing image: OVERWRITTEN, needs the image name typed; a wrong name writes nothing', async (t) => {
  const { r, backend } = await start({ stepMs: 2, rbdImages: { 'rbd://rbd/vms/vm-7': { size: 30 * GiB } } }, 100, 30);
  await press(r, KEY.down, KEY.down, KEY.enter); // root0003, 20 GiB
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('rbd://rbd/vms/vm-7\r');
  const frame = await waitForFrame(r, 'Check before restoring');
  t.regex(frame, /The existing RBD image \(30\.0 GiB\) is OVERWRITTEN and resized to 20\.0 GiB; its current\s+contents are lost\./);
  t.regex(frame, /type its name\s+vm-7\s+and press Enter/);
  r.stdin.write('vm-8\r');
  await waitForFrame(r, 'Error: You typed "vm-8", not "vm-7": nothing was written.');
  t.deepEqual(backend.restores, []);
  for (let i = 0; i < 4; i++) await press(r, KEY.backspace);
  r.stdin.write('vm-7\r');
  await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: 'rbd://rbd/vms/vm-7', force: true, resume: false }],
  );
  r.unmount();
});

test.serial('rbd:// to an image with watchers (in use by a VM) is refused on the Target step, with no override', async (t) => {
  const { r, backend } = await start({ rbdImages: { 'rbd://rbd/vm-busy': { size: 20 * GiB, watchers: ['10.0.0.5:0/123'] } } }, 100, 30);
  await press(r, KEY.down, KEY.down, KEY.enter);
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write('rbd://rbd/vm-busy\r');
  const frame = await waitForFrame(r, /Error: RBD image rbd\/vm-busy is in use \(watched by 10\.0\.0\.5:0\/123/);
  t.regex(frame, /not even with a typed confirmation/);
  t.regex(frame, /\[2 Target\]/);
  t.false(frame.includes('Check before restoring'));
  t.deepEqual(backend.restores, []);
  r.unmount();
});

test.serial('rbd:// resume: an interrupted restore to the image is offered; an INVALID version is not filled from another', async (t) => {
  const uri = 'rbd://rbd/vm-2';
  const { r, backend } = await start({ stepMs: 2, rbdImages: { [uri]: { size: 20 * GiB } }, interrupted: { [uri]: { version: 'root0002', blocks_done: 64 } } }, 100, 30);
  await press(r, KEY.down, KEY.down, KEY.down, KEY.enter); // root0002, INVALID
  await waitForFrame(r, 'Where should it be restored to?');
  r.stdin.write(`${uri}\r`);
  let frame = await waitForFrame(r, 'An interrupted restore of this version to this target exists');
  t.regex(frame, /it resumes at 1\.3 % \(64 of 5120 blocks\)/);
  t.regex(frame, /Damaged blocks: written as zeros\./);
  t.false(frame.includes('Tab: fill them'));
  await press(r, KEY.tab); // no fill for RBD targets: nothing changes
  frame = await waitForFrame(r, 'Damaged blocks: written as zeros.');
  await press(r, 'r');
  await waitForFrame(r, 'DONE');
  t.deepEqual(
    backend.restores.map((x) => x.req),
    [{ target: uri, force: false, resume: true }],
  );
  r.unmount();
});
