import test from 'ava';
import Table from 'cli-table3';
import { plainTable } from '../src/cli/output.js';

const head = ['id', 'name', 'snapshot', 'date', 'age', 'size', 'status', 'tags'];

test('plainTable draws exactly what cli-table3 draws for ASCII cells', (t) => {
  const rows = [
    ['6627zyes', 'tiny', '', '2026-12-03 06:28:48 +00:00', '0 s', '64.0 KiB', 'valid', ''],
    ['2ymnadwt', 'a-much-longer-volume-name', 'snap@1', '2026-12-03 06:28:47 +00:00', '3 d', '1.0 GiB', 'incomplete,INVALID,protected', 'b_daily,keep'],
  ];
  for (const body of [[], rows.slice(0, 1), rows]) {
    const table = new Table({ head, style: { head: [], border: [] } });
    for (const r of body) table.push(r);
    t.is(plainTable(head, body), table.toString());
  }
});

test('plainTable leaves cells it cannot measure (non-ASCII, control characters) to cli-table3', (t) => {
  t.is(plainTable(head, [['x', 'y', 'Schnappschuss ä', '', '', '', '', '']]), null);
  t.is(plainTable(head, [['x', 'y', 'two\nlines', '', '', '', '', '']]), null);
});
