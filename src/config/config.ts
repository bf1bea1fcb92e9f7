import { deferredWarnings, exposedSecretWarning } from '../util/secrets.js';
import { readFileSync } from 'node:fs';
import ini from 'ini';
import { UsageError } from '../errors.js';
import { parseDuration, parseSize } from '../util/size.js';

/**
 * appliance.conf: INI sections like backy2's. Every option has a default and a one-line description (the
 * same table generates `blocksafe config` output and is mirrored in appliance.conf.example). An unknown
 * section or key, or a bad value, is an error naming the file and line.
 */
type Kind = 'string' | 'size' | 'int' | 'bool' | 'enum' | 'duration';
interface Option {
  kind: Kind;
  default: string;
  doc: string;
  values?: readonly string[];
  min?: number;
  max?: number;
  /** Never shown by `blocksafe config` (passwords, secret keys). */
  secret?: boolean;
  /** Sizes that must be a power of two between 64K and 64M (block sizes). */
  pow2?: boolean;
}

export const SCHEMA = {
  repository: {
    repo: { kind: 'string', default: '', doc: 'Repository used when --repo and BLOCKSAFE_REPO are not given (a directory path or s3://BUCKET/PREFIX).' },
  },
  init: {
    block_size: { kind: 'size', default: '4M', pow2: true, doc: 'Block size of new repositories (a power of two from 64K to 64M).' },
    encryption: { kind: 'enum', default: 'chacha20-poly1305', values: ['chacha20-poly1305', 'none'], doc: 'Encryption of new repositories.' },
    compression: { kind: 'enum', default: 'zstd', values: ['zstd', 'none'], doc: 'Compression of new repositories.' },
    compression_level: { kind: 'int', default: '1', min: 1, max: 19, doc: 'zstd level of new repositories (1 is fastest).' },
  },
  lifecycle: {
    min_age_days: { kind: 'int', default: '0', min: 0, max: 3650, doc: 'rm refuses versions younger than this many days unless --force (0 = off; backy2 used 6).' },
    auto_tags: { kind: 'bool', default: 'true', doc: 'Tag new versions b_daily, b_weekly, b_monthly (first of each local day, ISO week, month per name).' },
  },
  lvm: {
    snapshot_size: { kind: 'string', default: '10%ORIGIN', doc: 'Size of classic (non-thin) LVM snapshots for lvm:// backups, as lvcreate -L/-l takes it (e.g. 5G or 20%ORIGIN).' },
  },
  ceph: {
    conf: { kind: 'string', default: '', doc: 'Ceph configuration file for rbd:// volumes (empty = CEPH_CONF, else /etc/ceph/ceph.conf).' },
    keyring: { kind: 'string', default: '', doc: 'Keyring file of the Ceph client (empty = what ceph.conf and CEPH_ARGS say, e.g. /etc/ceph/CLUSTER.client.ID.keyring).' },
    id: { kind: 'string', default: '', doc: 'Ceph client id (user name without "client."), e.g. backup for client.backup (empty = admin, or --id in CEPH_ARGS).' },
    cluster: { kind: 'string', default: '', doc: 'Ceph cluster name (empty = ceph).' },
    timeout: { kind: 'duration', default: '30s', doc: 'How long rbd waits for the Ceph monitors before an rbd:// command fails as "cluster unreachable".' },
  },
  cleanup: {
    grace: {
      kind: 'duration',
      default: '24h',
      doc: 'How long a block must stay unreferenced before cleanup deletes it. Below 1h only while nothing writes to the repository (e.g. --grace 0 for one-off maintenance).',
    },
  },
  locks: {
    refresh: { kind: 'duration', default: '5m', doc: 'Heartbeat of held locks and of the lease in the store (locks/) that machines sharing an S3 bucket see.' },
    stale_after: { kind: 'duration', default: '30m', doc: 'A lock holder silent for this long is counted as dead (a dead process on this machine is noticed at once).' },
    wait: { kind: 'duration', default: '0s', doc: 'How long a command waits for a lock held by another process before it gives up with exit code 4.' },
  },
  retention: {
    keep_last: {
      kind: 'int',
      default: '0',
      min: 0,
      max: 100000,
      doc: 'Default prune policy for every name: keep the N newest versions (0 = rule off). Per name: a [retention.NAME] section with the same keys.',
    },
    keep_hourly: { kind: 'int', default: '0', min: 0, max: 100000, doc: 'Keep the newest version of each of the last N hours (local time).' },
    keep_daily: { kind: 'int', default: '0', min: 0, max: 100000, doc: 'Keep the newest version of each of the last N days.' },
    keep_weekly: { kind: 'int', default: '0', min: 0, max: 100000, doc: 'Keep the newest version of each of the last N ISO weeks.' },
    keep_monthly: { kind: 'int', default: '0', min: 0, max: 100000, doc: 'Keep the newest version of each of the last N months.' },
    keep_yearly: { kind: 'int', default: '0', min: 0, max: 100000, doc: 'Keep the newest version of each of the last N years.' },
  },
  pipeline: {
    threads: { kind: 'int', default: '0', min: 0, max: 64, doc: 'Worker threads for checksums, compression and encryption (0 = one per core).' },
    queue_depth: { kind: 'int', default: '0', min: 0, max: 256, doc: 'Blocks in flight at once (0 = threads + 2); each costs about 4 × the block size of memory.' },
    read_limit: { kind: 'size', default: '0', doc: 'Read bandwidth limit in bytes per second, e.g. 50M (0 = unlimited): the source on backup, the store on restore.' },
    write_limit: { kind: 'size', default: '0', doc: 'Write bandwidth limit in bytes per second (0 = unlimited): the store on backup, the target on restore.' },
    direct_io: { kind: 'bool', default: 'true', doc: 'Read backup sources with O_DIRECT so they do not flood the page cache (falls back where unsupported).' },
  },
  nbd: {
    max_connections: {
      kind: 'int',
      default: '16',
      min: 1,
      max: 4096,
      doc: 'blocksafe nbd: connections open at once (in the handshake or transmitting); more are closed at once and logged (--max-connections).',
    },
    handshake_timeout: {
      kind: 'duration',
      default: '10s',
      doc: 'blocksafe nbd: a client must complete the handshake (TLS included) within this time, else it is disconnected (--handshake-timeout; 0 = no limit).',
    },
    idle_timeout: {
      kind: 'duration',
      default: '0',
      doc: 'blocksafe nbd: disconnect a client that has no request in flight and sends nothing for this long (--idle-timeout; 0 = never, so that an idle mount stays usable).',
    },
    stall_timeout: {
      kind: 'duration',
      default: '30s',
      doc: 'blocksafe nbd: disconnect a client that stops sending in the middle of a request, or stops reading its replies, for this long (--stall-timeout; 0 = never).',
    },
    request_memory: {
      kind: 'size',
      default: '128M',
      doc: 'blocksafe nbd: memory for request data in flight across all connections (write payloads, read results); further requests wait. At least 32M (one maximum-size request).',
    },
  },
  s3: {
    endpoint: {
      kind: 'string',
      default: '',
      doc: 'S3 endpoint URL for s3:// repositories, e.g. http://127.0.0.1:7480 for Ceph RGW or MinIO (empty = AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS itself).',
    },
    region: { kind: 'string', default: '', doc: 'S3 region (empty = AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1).' },
    force_path_style: { kind: 'bool', default: 'false', doc: 'Address buckets as ENDPOINT/BUCKET instead of BUCKET.ENDPOINT (needed by most Ceph RGW and MinIO set-ups).' },
    access_key_id: { kind: 'string', default: '', doc: 'S3 access key (empty = credentials_file, then the standard AWS chain: AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/credentials, ...).' },
    secret_access_key: { kind: 'string', default: '', secret: true, doc: 'S3 secret key belonging to access_key_id (never printed).' },
    credentials_file: { kind: 'string', default: '', doc: 'File in AWS credentials format ([profile] aws_access_key_id = ..., aws_secret_access_key = ...), used when access_key_id is empty.' },
    profile: { kind: 'string', default: '', doc: 'Profile (section) of credentials_file (empty = AWS_PROFILE, then default).' },
    state_dir: {
      kind: 'string',
      default: '',
      doc: 'Local directory for the LMDB index of S3 repositories (one sub-directory per repository id) and for the trust records of every repository (trust/: encryption mode and keyring generation last seen, so that a replaced descriptor or an old keyring put back is refused) (empty = /var/lib/blocksafe as root, else $XDG_STATE_HOME/blocksafe or ~/.local/state/blocksafe).',
    },
    concurrency: { kind: 'int', default: '8', min: 1, max: 256, doc: 'S3 requests in flight at once (uploads, downloads, deletes, listings).' },
    timeout: { kind: 'duration', default: '60s', doc: 'Per-request timeout: a request without a complete answer by then is aborted and retried.' },
    connect_timeout: { kind: 'duration', default: '10s', doc: 'Timeout for opening a connection to the endpoint.' },
    retries: { kind: 'int', default: '5', min: 0, max: 100, doc: 'Retries of a request after transient errors (5xx, throttling/SlowDown, resets, refused connections, timeouts).' },
    retry_delay: { kind: 'duration', default: '200ms', doc: 'Backoff before the first retry; it doubles with each retry (with random jitter) up to retry_max_delay.' },
    retry_max_delay: { kind: 'duration', default: '20s', doc: 'Longest backoff between two retries.' },
    delete_batch: { kind: 'int', default: '1000', min: 1, max: 1000, doc: 'Keys per DeleteObjects request (S3 allows at most 1000); each batch is retried on its own.' },
    list_page: { kind: 'int', default: '1000', min: 1, max: 1000, doc: 'Keys per ListObjectsV2 page.' },
    upload_limit: { kind: 'size', default: '0', doc: 'S3 upload bandwidth limit in bytes per second, e.g. 20M (0 = unlimited).' },
    download_limit: { kind: 'size', default: '0', doc: 'S3 download bandwidth limit in bytes per second (0 = unlimited).' },
  },
} as const satisfies Record<string, Record<string, Option>>;

type Schema = typeof SCHEMA;
type ValueOf<O extends Option> = O['kind'] extends 'size' | 'int' | 'duration' ? number : O['kind'] extends 'bool' ? boolean : string;
export type Config = { [S in keyof Schema]: { [K in keyof Schema[S]]: Schema[S][K] extends Option ? ValueOf<Schema[S][K]> : never } };

export interface LoadedConfig {
  config: Config;
  /** Per-name retention policies from [retention.NAME] sections (same keys as [retention]). */
  retentionByName: Record<string, Partial<Config['retention']>>;
  /** The file it came from, or null when only defaults apply. */
  file: string | null;
}

function parseValue(opt: Option, raw: string, where: string): string | number | boolean {
  const bad = (why: string) => new UsageError(`${where}: ${why}.`);
  switch (opt.kind) {
    case 'string':
      return raw;
    case 'size': {
      let n: number;
      try {
        n = parseSize(raw);
      } catch {
        throw bad(`"${printable(raw)}" is not a size (use e.g. 4M)`);
      }
      if (opt.pow2 && (n < 65536 || n > 64 * 2 ** 20 || (n & (n - 1)) !== 0)) throw bad(`${raw} is not a power of two from 64K to 64M`);
      return n;
    }
    case 'duration':
      try {
        return parseDuration(raw);
      } catch {
        throw bad(`"${raw}" is not a duration (use e.g. 30s, 15m, 1h, 7d)`);
      }
    case 'int': {
      if (!/^-?\d+$/.test(raw.trim())) throw bad(`"${raw}" is not a whole number`);
      const n = Number(raw);
      if ((opt.min !== undefined && n < opt.min) || (opt.max !== undefined && n > opt.max)) throw bad(`${n} is outside ${opt.min}..${opt.max}`);
      return n;
    }
    case 'bool':
      if (/^(true|yes|on|1)$/i.test(raw)) return true;
      if (/^(false|no|off|0)$/i.test(raw)) return false;
      throw bad(`"${raw}" is not true or false`);
    case 'enum':
      if (!opt.values!.includes(raw)) throw bad(`"${raw}" is not one of ${opt.values!.join(', ')}`);
      return raw;
  }
}

export function defaults(): Config {
  const out: Record<string, Record<string, unknown>> = {};
  for (const [section, opts] of Object.entries(SCHEMA)) {
    out[section] = {};
    for (const [key, opt] of Object.entries(opts as Record<string, Option>)) out[section]![key] = parseValue(opt, opt.default, `default of ${section}.${key}`);
  }
  return out as Config;
}

/** Line number (1-based) of `key` inside `[section]` in the INI text, for error messages. */
function lineOf(text: string, section: string | null, key?: string): number {
  const lines = text.split(/\r?\n/);
  let current: string | null = null;
  let found = 0;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    const sec = /^\[(.*)\]$/.exec(line);
    if (sec) {
      current = sec[1]!.trim();
      if (key === undefined && current === section) return i + 1;
      continue;
    }
    // The last occurrence wins in the parser, so name the last one.
    if (key !== undefined && current === section && line.split('=')[0]!.trim() === key) found = i + 1;
  }
  return found;
}

/** Shows text from a file in a message without letting terminal control characters through. */
function printable(text: string): string {
  return text.replace(/[\x00-\x1f\x7f-\x9f]/g, '?');
}

function parseRetentionSection(text: string, file: string, name: string, body: Record<string, unknown>): Partial<Config['retention']> {
  const section = `retention.${name}`;
  const opts = SCHEMA.retention as Record<string, Option>;
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(body)) {
    const where = `${file}:${lineOf(text, section, key)}`;
    const opt = opts[key];
    if (!opt) throw new UsageError(`${where}: unknown option "${key}" in [${section}] (known: ${Object.keys(opts).join(', ')}).`);
    const rawValue = typeof value === 'boolean' ? String(value) : value;
    if (typeof rawValue !== 'string') throw new UsageError(`${where}: option "${key}" needs a value.`);
    out[key] = parseValue(opt, rawValue.trim(), `${where}: ${section}.${key}`);
  }
  return out as Partial<Config['retention']>;
}

export function parseConfig(text: string, file: string): Config {
  return parseConfigText(text, file).config;
}

/** Parses a whole configuration text: the options and the per-name retention sections. */
export function parseConfigText(text: string, file: string): Omit<LoadedConfig, 'file'> {
  const retentionByName: LoadedConfig['retentionByName'] = {};
  text = text.replace(/^\uFEFF/, ''); // a byte-order mark some editors write
  if (text.includes('\0')) throw new UsageError(`${file} is not a text configuration file (it contains binary data).`);
  for (const [i, raw] of text.split(/\r?\n/).entries()) {
    const line = raw.trim();
    const header = /^\[([^\]]+)\]$/.exec(line);
    if (header) {
      // Checked here, before the ini parser nests dotted names and drops names like __proto__.
      const name = header[1]!.trim();
      const known = name in SCHEMA && Object.prototype.hasOwnProperty.call(SCHEMA, name);
      if (!known && !/^retention\.[A-Za-z0-9][A-Za-z0-9._@:+\\-]*$/.test(name)) {
        throw new UsageError(`${file}:${i + 1}: unknown section [${printable(name)}] (known: ${Object.keys(SCHEMA).join(', ')}, retention.NAME).`);
      }
      continue;
    }
    if (line === '' || line.startsWith('#') || line.startsWith(';') || /^[^=[\]]+=/.test(line)) continue;
    throw new UsageError(`${file}:${i + 1}: cannot parse "${printable(line.slice(0, 60))}" (expected [section] or key = value).`);
  }
  const parsed = ini.parse(text) as Record<string, unknown>;
  const config = defaults() as Record<string, Record<string, unknown>>;
  for (const [section, body] of Object.entries(parsed)) {
    const opts = (SCHEMA as Record<string, Record<string, Option>>)[section];
    if (typeof body !== 'object' || body === null) {
      throw new UsageError(`${file}:${lineOf(text, null, section)}: "${section}" is outside any [section].`);
    }
    if (!opts) throw new UsageError(`${file}:${lineOf(text, section)}: unknown section [${section}] (known: ${Object.keys(SCHEMA).join(', ')}).`);
    for (const [key, value] of Object.entries(body as Record<string, unknown>)) {
      if (section === 'retention' && typeof value === 'object' && value !== null) {
        retentionByName[key] = parseRetentionSection(text, file, key, value as Record<string, unknown>);
        continue;
      }
      const where = `${file}:${lineOf(text, section, key)}`;
      const opt = opts[key];
      if (!opt) throw new UsageError(`${where}: unknown option "${printable(key)}" in [${section}] (known: ${Object.keys(opts).join(', ')}).`);
      // The ini package turns "true"/"false" into booleans: take them back as text.
      const rawValue = typeof value === 'boolean' ? String(value) : value;
      if (typeof rawValue !== 'string') throw new UsageError(`${where}: option "${key}" needs a value.`);
      config[section]![key] = parseValue(opt, rawValue.trim(), `${where}: ${section}.${key}`);
    }
  }
  return { config: config as Config, retentionByName };
}

/** Finds and reads the configuration: --config, then $BLOCKSAFE_CONFIG, then /etc/blocksafe/appliance.conf. */
export function loadConfig(explicit?: string, env: NodeJS.ProcessEnv = process.env): LoadedConfig {
  const candidates: [string, boolean][] = [];
  if (explicit) candidates.push([explicit, true]);
  else if (env.BLOCKSAFE_CONFIG) candidates.push([env.BLOCKSAFE_CONFIG, true]);
  else candidates.push(['/etc/blocksafe/appliance.conf', false]);
  for (const [file, required] of candidates) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' && !required) continue;
      if (code === 'ENOENT') throw new UsageError(`Configuration file ${file} does not exist.`);
      throw new UsageError(`Configuration file ${file} cannot be read (${code ?? (err as Error).message}).`);
    }
    const loaded = { ...parseConfigText(text, file), file };
    if (hasSecret(loaded.config)) {
      const warning = exposedSecretWarning(file, 'The configuration file (it holds a secret)');
      if (warning) deferredWarnings.push(warning);
    }
    return loaded;
  }
  return { config: defaults(), file: null, retentionByName: {} };
}

function hasSecret(c: Config): boolean {
  return Object.entries(SCHEMA).some(([section, opts]) =>
    Object.entries(opts as Record<string, Option>).some(([key, opt]) => opt.secret && (c as Record<string, Record<string, unknown>>)[section]![key] !== ''),
  );
}

/** The effective configuration as INI text with each option's description. */
export function formatConfig(loaded: LoadedConfig): string {
  const lines = [`# effective configuration (${loaded.file ?? 'defaults only, no configuration file found'})`];
  for (const [section, opts] of Object.entries(SCHEMA)) {
    lines.push('', `[${section}]`);
    for (const [key, opt] of Object.entries(opts as Record<string, Option>)) {
      const value = (maskSecrets(loaded.config) as Record<string, Record<string, unknown>>)[section]![key];
      // Durations are held in ms; a bare number would read back as seconds.
      lines.push(`# ${opt.doc}`, `${key} = ${opt.kind === 'duration' ? `${value}ms` : value}`);
    }
  }
  for (const [name, policy] of Object.entries(loaded.retentionByName)) {
    lines.push('', `[retention.${name}]`, ...Object.entries(policy).map(([k, v]) => `${k} = ${v}`));
  }
  return lines.join('\n') + '\n';
}

/** appliance.conf.example: every section and option with its description and default (test/config-example checks the file). */
export function exampleConfig(): string {
  const lines = [
    '# blocksafe configuration (INI). Found via --config, then $BLOCKSAFE_CONFIG, then /etc/blocksafe/appliance.conf.',
    '# Every option is optional; the values below are the defaults. An unknown section or option, or a bad',
    '# value, is an error naming the line. `blocksafe config` prints the effective configuration.',
  ];
  for (const [section, opts] of Object.entries(SCHEMA)) {
    lines.push('', `[${section}]`);
    for (const [key, opt] of Object.entries(opts as Record<string, Option>)) {
      const values = opt.values ? ` One of: ${opt.values.join(', ')}.` : '';
      lines.push(`# ${opt.doc}${values}`, `${key} = ${opt.default}`);
    }
  }
  lines.push('', '# Per volume name, a retention policy overriding [retention] (same keys), e.g.:', '# [retention.root]', '# keep_daily = 14');
  return lines.join('\n') + '\n';
}

/** A copy of the configuration with secret options (e.g. [s3] secret_access_key) replaced by "********" when set. */
export function maskSecrets(config: Config): Config {
  const out: Record<string, Record<string, unknown>> = {};
  for (const [section, values] of Object.entries(config as Record<string, Record<string, unknown>>)) {
    const opts = (SCHEMA as Record<string, Record<string, Option>>)[section] ?? {};
    out[section] = Object.fromEntries(Object.entries(values).map(([k, v]) => [k, opts[k]?.secret && v !== '' ? '********' : v]));
  }
  return out as Config;
}
