#!/usr/bin/env node
// Turns bench/work/results/measurements.tsv (written by bench/run.sh) into the printed table and
// bench/work/results.json. Medians over runs, each metric separately.
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values: opt } = parseArgs({
  options: {
    tsv: { type: 'string' },
    out: { type: 'string' },
    'image-bytes': { type: 'string' },
    size: { type: 'string', default: '?' },
    runs: { type: 'string', default: '1' },
    'hints-supported': { type: 'string', default: '0' },
    versions: { type: 'string', default: '' },
    mutate: { type: 'string' },
    nproc: { type: 'string', default: '?' },
    logs: { type: 'string' },
    'blocksafe-config': { type: 'string', default: '' },
    load: { type: 'string', default: '' },
  },
});
if (!opt.tsv || !opt.out || !opt['image-bytes']) {
  console.error('usage: report.mjs --tsv FILE --out FILE --image-bytes N [...]');
  process.exit(2);
}

const MiB = 1024 * 1024;
const imageBytes = Number(opt['image-bytes']);
const [header, ...lines] = readFileSync(opt.tsv, 'utf8').split('\n').filter(Boolean);
const cols = header.split('\t');
const meas = lines.map((l) => {
  const f = l.split('\t');
  const o = Object.fromEntries(cols.map((c, i) => [c, f[i] ?? '']));
  for (const k of ['run', 'wall_s', 'user_s', 'sys_s', 'maxrss_kib', 'repo_bytes']) o[k] = o[k] === '' ? null : Number(o[k]);
  return o;
});

const median = (xs) => {
  const v = xs.filter((x) => x !== null && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};

const TOOL_LABEL = {
  blocksafe: 'blocksafe',
  'blocksafe-hints': 'blocksafe --hints',
  restic: 'restic',
  'borg-lz4': 'borg lz4',
  'borg-zstd': 'borg zstd,3',
};
const STEP_LABEL = { backup1: 'backup 1', backup2: 'backup 2', restore: 'restore' };
const PEERS = ['restic', 'borg-lz4', 'borg-zstd'];

const ORDER = ['blocksafe', 'blocksafe-hints', ...PEERS];
const rank = (t) => (ORDER.includes(t) ? ORDER.indexOf(t) : ORDER.length);
const tools = [...new Set(meas.map((m) => m.tool))].sort((a, b) => rank(a) - rank(b));

// blocksafe's own statistics (--json output of backup), kept in results.json
function toolStats(m) {
  if (!opt.logs || !m.tool.startsWith('blocksafe') || m.step === 'restore') return undefined;
  try {
    const o = JSON.parse(readFileSync(`${opt.logs}/${m.tool}.${m.step}.run${m.run}.out`, 'utf8'));
    return { id: o.id, base: o.base ?? null, stats: o.stats };
  } catch {
    return undefined;
  }
}
const rows = [];
for (const tool of tools) {
  for (const step of ['backup1', 'backup2', 'restore']) {
    const timed = meas.filter((m) => m.tool === tool && m.step === step && m.repo_bytes === null);
    if (!timed.length) continue;
    const ok = timed.filter((m) => m.status === 'ok');
    const fails = timed.filter((m) => m.status !== 'ok').map((m) => `run ${m.run}: ${m.status}`);
    if (step === 'restore') {
      for (const v of meas.filter((m) => m.tool === tool && m.step === 'verify' && m.status !== 'ok')) {
        fails.push(`run ${v.run}: ${v.status}`);
      }
    }
    const wall = median(ok.map((m) => m.wall_s));
    const cpu = median(ok.map((m) => m.user_s + m.sys_s));
    const rssKiB = median(ok.map((m) => m.maxrss_kib));
    const repo = median(meas.filter((m) => m.tool === tool && m.step === step && m.repo_bytes !== null).map((m) => m.repo_bytes));
    rows.push({
      tool,
      step,
      runs: ok.length,
      mib_per_s: wall ? imageBytes / MiB / wall : null,
      wall_s: wall,
      cpu_s: cpu,
      peak_rss_mib: rssKiB === null ? null : rssKiB / 1024,
      repo_mib: repo === null ? null : repo / MiB,
      status: fails.length ? 'FAIL' : 'ok',
      failures: fails,
      samples: timed.map((m) => ({ run: m.run, wall_s: m.wall_s, user_s: m.user_s, sys_s: m.sys_s, maxrss_kib: m.maxrss_kib, status: m.status, blocksafe: toolStats(m) })),
    });
  }
}
const row = (tool, step) => rows.find((r) => r.tool === tool && r.step === step && r.status === 'ok');
const maxRss = (tool) => {
  const v = rows.filter((r) => r.tool === tool && r.peak_rss_mib !== null).map((r) => r.peak_rss_mib);
  return v.length ? Math.max(...v) : null;
};

// ---------------------------------------------------------------- ratios blocksafe / peer
const div = (a, b) => (a === null || a === undefined || !b ? null : a / b);
const peersPresent = PEERS.filter((p) => tools.includes(p));
const ratios = {};
for (const p of peersPresent) {
  ratios[p] = {
    backup1_throughput: div(row('blocksafe', 'backup1')?.mib_per_s, row(p, 'backup1')?.mib_per_s),
    backup1_cpu: div(row('blocksafe', 'backup1')?.cpu_s, row(p, 'backup1')?.cpu_s),
    backup2_time: div(row('blocksafe', 'backup2')?.wall_s, row(p, 'backup2')?.wall_s),
    ...(tools.includes('blocksafe-hints') ? { backup2_hints_time: div(row('blocksafe-hints', 'backup2')?.wall_s, row(p, 'backup2')?.wall_s) } : {}),
    restore_time: div(row('blocksafe', 'restore')?.wall_s, row(p, 'restore')?.wall_s),
    restore_cpu: div(row('blocksafe', 'restore')?.cpu_s, row(p, 'restore')?.cpu_s),
    peak_rss: div(maxRss('blocksafe'), maxRss(p)),
  };
}

// ---------------------------------------------------------------- SPEC targets
const targets = [];
const target = (name, value, goal, pass) => targets.push({ target: name, value, goal, result: value === null ? 'n/a' : pass ? 'PASS' : 'FAIL' });
{
  const r = ratios.restic?.backup1_throughput ?? null;
  target('backup 1 throughput >= 3x restic', r, 3, r !== null && r >= 3);
  const b = ratios['borg-lz4']?.backup1_throughput ?? null;
  target('backup 1 throughput >= 2x borg-lz4', b, 2, b !== null && b >= 2);
  const peerRestores = peersPresent.map((p) => row(p, 'restore')?.wall_s).filter((x) => x);
  const bs = row('blocksafe', 'restore')?.wall_s;
  const sp = peerRestores.length && bs ? Math.min(...peerRestores) / bs : null;
  target('restore >= 2x fastest peer (peer time / blocksafe time)', sp, 2, sp !== null && sp >= 2);
  const rss = [maxRss('blocksafe'), maxRss('blocksafe-hints')].filter((x) => x !== null);
  const m = rss.length ? Math.max(...rss) : null;
  target('blocksafe peak RSS <= 150 MiB (MiB, any step)', m, 150, m !== null && m <= 150);
  // issue 16: CPU (user + sys) per GiB of image, so that a loaded machine's wall clock does not decide
  const gib = imageBytes / (1024 * MiB);
  const perGiB = (x) => (x === null || x === undefined ? null : x / gib);
  const b1 = perGiB(row('blocksafe', 'backup1')?.cpu_s);
  target('blocksafe backup 1 CPU <= 3.0 s per GiB', b1, 3, b1 !== null && b1 <= 3);
  const rc = perGiB(row('blocksafe', 'restore')?.cpu_s);
  target('blocksafe restore CPU <= 2.5 s per GiB', rc, 2.5, rc !== null && rc <= 2.5);
}

// ---------------------------------------------------------------- print
const fmt = (x, d = 1) => (x === null || x === undefined ? '-' : x.toFixed(d));
const table = (head, body, alignLeft = 1) => {
  const all = [head, ...body];
  const w = head.map((_, i) => Math.max(...all.map((r) => String(r[i]).length)));
  const line = (r) => '| ' + r.map((c, i) => (i < alignLeft ? String(c).padEnd(w[i]) : String(c).padStart(w[i]))).join(' | ') + ' |';
  const sep = '|' + w.map((n, i) => (i < alignLeft ? '-'.repeat(n + 2) : '-'.repeat(n + 1) + ':')).join('|') + '|';
  return [line(head), sep, ...body.map(line)].join('\n');
};

let mutate = null;
if (opt.mutate && existsSync(opt.mutate)) {
  try {
    const { out: _o, hints: _h, ...m } = JSON.parse(readFileSync(opt.mutate, 'utf8'));
    mutate = m;
  } catch {
    /* informational only */
  }
}
const runs = Number(opt.runs);
const bsConfig = Object.fromEntries(
  opt['blocksafe-config']
    .split('\n')
    .filter((l) => l.includes('='))
    .map((l) => [l.slice(0, l.indexOf('=')).trim(), l.slice(l.indexOf('=') + 1).trim()]),
);
const out = [];
out.push('');
out.push(
  `blocksafe benchmark: image ${opt.size} (${imageBytes} bytes, mkimage.py seed 1), mutated copy: ` +
    (mutate ? `${(mutate.fraction * 100).toFixed(2)} % in ${mutate.regions} regions of 64 KiB` : '1 % in 64 KiB regions'),
);
out.push(
  `${runs} run(s)${runs > 1 ? ', medians' : ''}; WARM page cache (not dropped); shared ${opt.nproc}-core VM` +
    (opt.load ? ` (load average before / after: ${opt.load})` : '') +
    ': absolute numbers drift, compare within one run.',
);
out.push(opt.versions.split('\n').filter(Boolean).join('; '));
if (Object.keys(bsConfig).length) {
  const keys = ['block_size', 'encryption', 'compression', 'compression_level', 'threads', 'queue_depth', 'direct_io'];
  out.push(
    'blocksafe settings: ' +
      keys
        .filter((k) => k in bsConfig)
        .map((k) => `${k}=${bsConfig[k]}`)
        .join(' ') +
      (bsConfig.direct_io === 'true' ? ' (O_DIRECT: blocksafe reads the images from disk, the peers from the warm page cache)' : ''),
  );
}
out.push('MiB/s = image size / wall time; CPU = user + sys; peak RSS from /usr/bin/time; repo = du -sb after the step.');
out.push('');
out.push(
  table(
    ['tool', 'step', 'MiB/s', 'wall s', 'CPU s', 'peak RSS MiB', 'repo MiB'],
    rows.map((r) => [TOOL_LABEL[r.tool] ?? r.tool, STEP_LABEL[r.step] + (r.status === 'ok' ? '' : ' FAIL'), fmt(r.mib_per_s), fmt(r.wall_s, 2), fmt(r.cpu_s, 2), fmt(r.peak_rss_mib), fmt(r.repo_mib)]),
    2,
  ),
);
for (const r of rows.filter((x) => x.status !== 'ok')) {
  out.push(`FAIL ${TOOL_LABEL[r.tool] ?? r.tool} ${STEP_LABEL[r.step]}: ${r.failures.join('; ')}`);
}
if (peersPresent.length && tools.includes('blocksafe')) {
  out.push('');
  out.push('blocksafe / peer (throughput: higher is better; times and RSS: lower is better; CPU time is the steadier figure on a busy machine)');
  out.push('');
  const metrics = [
    ['backup 1 throughput', 'backup1_throughput'],
    ['backup 1 CPU time', 'backup1_cpu'],
    ['backup 2 time', 'backup2_time'],
    ...(tools.includes('blocksafe-hints') ? [['backup 2 time (--hints)', 'backup2_hints_time']] : []),
    ['restore time', 'restore_time'],
    ['restore CPU time', 'restore_cpu'],
    ['peak RSS (max of steps)', 'peak_rss'],
  ];
  out.push(
    table(
      ['ratio', ...peersPresent.map((p) => TOOL_LABEL[p])],
      metrics.map(([label, k]) => [label, ...peersPresent.map((p) => (ratios[p][k] === null ? '-' : fmt(ratios[p][k], 2) + 'x'))]),
    ),
  );
}
out.push('');
out.push('SPEC targets');
out.push('');
out.push(
  table(
    ['target', 'value', 'result'],
    targets.map((t) => [t.target, fmt(t.value, 2), t.result]),
  ),
);
if (opt['hints-supported'] === '0') out.push('\n(blocksafe backup has no --hints/--from yet: hinted incremental not measured)');
out.push('');
console.log(out.join('\n'));

writeFileSync(
  opt.out,
  JSON.stringify(
    {
      meta: {
        date: new Date().toISOString(),
        image_size: opt.size,
        image_bytes: imageBytes,
        runs,
        aggregate: 'median',
        page_cache: 'warm (not dropped)',
        nproc: Number(opt.nproc) || opt.nproc,
        load_average_before_after: opt.load || null,
        versions: opt.versions.split('\n').filter(Boolean),
        blocksafe_config: Object.keys(bsConfig).length ? bsConfig : null,
        hints_supported: { 1: true, 0: false }[opt['hints-supported']] ?? null,
        mutation: mutate,
      },
      rows,
      ratios_blocksafe_over_peer: ratios,
      targets,
    },
    null,
    2,
  ) + '\n',
);
console.log(`(written ${opt.out})`);
