/**
 * Parser for the XML that `thin_delta` (Debian's thin-provisioning-tools) prints when it compares two thin
 * devices of one pool:
 *
 *   <superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="1024">
 *     <diff left="2" right="3">
 *       <same begin="0" length="10"/>            compact output (default)
 *       <different begin="10" length="10"/>
 *       <left_only begin="200" length="50"/>
 *       <right_only begin="600" length="5"/>
 *     </diff>
 *   </superblock>
 *
 * and with `--verbose` the same sections as containers of `<range begin=".." length=".." …/>` elements.
 * `begin`/`length` count blocks of the thin device's address space in units of the pool's data block size
 * (the pool's chunk size), so byte offset = begin × chunk size.
 *
 * Meaning for a backup of the right device relative to a backup of the left one:
 *  - `different`, `right_only` → changed data: read it (exists: true);
 *  - `left_only` → unmapped now, so it reads as zeros (exists: false);
 *  - `same` → unchanged, and ranges mapped in neither device are unchanged zeros.
 *
 * The format is flat, so a small tag scanner is enough. It is strict: an element it does not know inside
 * `<diff>` is an error, because silently skipping a kind of change would make a backup miss changed data.
 * The parser is incremental (`ThinDeltaParser.push`) so that a huge delta is never held as one string.
 */
import type { Extent } from './hints.js';
import { BlocksafeError } from '../errors.js';

export interface ThinDelta {
  /** thin_id of the left (older) device, from `<diff left=..>`. */
  left: number | null;
  /** thin_id of the right (newer) device, from `<diff right=..>`. */
  right: number | null;
  /** The pool's data block size in bytes as thin_delta reports it (`data_block_size` is in 512-byte sectors). */
  dataBlockSizeBytes: number | null;
  /** Changed byte extents, sorted, adjacent extents of the same kind merged. */
  extents: Extent[];
}

type Section = 'same' | 'different' | 'left_only' | 'right_only';
const SECTIONS = new Set<string>(['same', 'different', 'left_only', 'right_only']);

function bad(why: string): BlocksafeError {
  return new BlocksafeError(`thin_delta output is not understood (${why}); the change hints cannot be trusted, so back up without them.`);
}

function attributes(text: string): Map<string, string> {
  const out = new Map<string, string>();
  const re = /([A-Za-z_][\w.-]*)\s*=\s*(?:"([^"]*)"|'([^']*)')/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text)) !== null) out.set(m[1]!, m[2] ?? m[3] ?? '');
  return out;
}

function intAttr(attrs: Map<string, string>, name: string, tag: string): number {
  const v = attrs.get(name);
  if (v === undefined) throw bad(`<${tag}> without "${name}"`);
  if (!/^\d+$/.test(v)) throw bad(`<${tag} ${name}="${v}"> is not a non-negative integer`);
  const n = Number(v);
  if (!Number.isSafeInteger(n)) throw bad(`<${tag} ${name}="${v}"> is too large`);
  return n;
}

function optionalInt(attrs: Map<string, string>, name: string, tag: string): number | null {
  return attrs.has(name) ? intAttr(attrs, name, tag) : null;
}

/** Incremental thin_delta XML parser: push text chunks as they arrive, then call end(). */
export class ThinDeltaParser {
  private readonly chunk: number;
  private buffer = '';
  private inDiff = false;
  private sawDiff = false;
  private closedDiff = false;
  private section: Section | null = null;
  private unsorted = false;
  private lastEnd = 0;
  private readonly extents: Extent[] = [];
  private left: number | null = null;
  private right: number | null = null;
  private dataBlockSizeBytes: number | null = null;

  constructor(chunkSizeBytes: number) {
    if (!Number.isSafeInteger(chunkSizeBytes) || chunkSizeBytes <= 0 || chunkSizeBytes % 512 !== 0) {
      throw new BlocksafeError(`The thin pool chunk size ${chunkSizeBytes} is not a positive multiple of 512 bytes; check \`lvs -o chunk_size\` of the pool.`);
    }
    this.chunk = chunkSizeBytes;
  }

  push(text: string): void {
    this.buffer += text;
    let pos = 0;
    for (;;) {
      const lt = this.buffer.indexOf('<', pos);
      if (lt < 0) {
        pos = this.buffer.length;
        break;
      }
      const gt = this.buffer.indexOf('>', lt);
      if (gt < 0) {
        pos = lt;
        break;
      }
      this.tag(this.buffer.slice(lt + 1, gt));
      pos = gt + 1;
    }
    this.buffer = this.buffer.slice(pos);
  }

  end(): ThinDelta {
    if (this.buffer.trim() !== '') throw bad('it ends in the middle of an element; was thin_delta interrupted?');
    if (!this.sawDiff) throw bad('no <diff> element');
    if (!this.closedDiff) throw bad('the <diff> element is not closed; was thin_delta interrupted?');
    let extents = this.extents;
    if (this.unsorted) {
      extents = mergeExtents([...extents].sort((a, b) => a.offset - b.offset || Number(a.exists) - Number(b.exists)));
    }
    return { left: this.left, right: this.right, dataBlockSizeBytes: this.dataBlockSizeBytes, extents };
  }

  private tag(raw: string): void {
    if (raw.startsWith('?') || raw.startsWith('!')) return; // <?xml …?>, comments, doctype
    const closing = raw.startsWith('/');
    const selfClosing = raw.endsWith('/');
    const body = raw.slice(closing ? 1 : 0, selfClosing ? -1 : undefined).trim();
    const nameMatch = /^[A-Za-z_][\w.-]*/.exec(body);
    if (!nameMatch) throw bad(`malformed tag <${raw}>`);
    const name = nameMatch[0];
    const attrs = attributes(body.slice(name.length));

    if (name === 'superblock') {
      if (!closing) {
        const sectors = optionalInt(attrs, 'data_block_size', name);
        if (sectors !== null) this.dataBlockSizeBytes = sectors * 512;
        if (this.dataBlockSizeBytes !== null && this.dataBlockSizeBytes !== this.chunk) {
          throw bad(`it reports a data block size of ${this.dataBlockSizeBytes} bytes but the pool's chunk size is ${this.chunk} bytes`);
        }
      }
      return;
    }
    if (name === 'diff') {
      if (closing) {
        if (!this.inDiff) throw bad('</diff> without <diff>');
        this.inDiff = false;
        this.closedDiff = true;
        return;
      }
      if (this.sawDiff) throw bad('more than one <diff> element');
      this.sawDiff = true;
      this.left = optionalInt(attrs, 'left', name);
      this.right = optionalInt(attrs, 'right', name);
      if (selfClosing) this.closedDiff = true;
      else this.inDiff = true;
      return;
    }
    if (!this.inDiff) {
      if (SECTIONS.has(name) || name === 'range') throw bad(`<${name}> outside <diff>`);
      return; // anything else outside <diff> (future superblock children) does not describe changes
    }
    if (SECTIONS.has(name)) {
      if (closing) {
        if (this.section !== name) throw bad(`</${name}> does not close <${this.section ?? 'nothing'}>`);
        this.section = null;
        return;
      }
      if (this.section !== null) throw bad(`<${name}> inside <${this.section}>`);
      if (selfClosing) {
        // compact form: <different begin=".." length=".."/>
        this.range(name as Section, attrs, name);
      } else {
        this.section = name as Section;
      }
      return;
    }
    if (name === 'range') {
      if (closing) return;
      if (this.section === null) throw bad('<range> outside a same/different/left_only/right_only section');
      this.range(this.section, attrs, name);
      if (!selfClosing) throw bad('<range> must be an empty element');
      return;
    }
    throw bad(`unknown element <${name}> inside <diff>`);
  }

  private range(kind: Section, attrs: Map<string, string>, tag: string): void {
    const begin = intAttr(attrs, 'begin', tag);
    const length = intAttr(attrs, 'length', tag);
    if (kind === 'same' || length === 0) return;
    const offset = begin * this.chunk;
    const bytes = length * this.chunk;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(offset + bytes)) throw bad(`range ${begin}+${length} is beyond any volume size`);
    const exists = kind !== 'left_only';
    if (offset < this.lastEnd) this.unsorted = true;
    this.lastEnd = Math.max(this.lastEnd, offset + bytes);
    const last = this.extents[this.extents.length - 1];
    if (last && last.exists === exists && last.offset + last.length === offset) last.length += bytes;
    else this.extents.push({ offset, length: bytes, exists });
  }
}

/**
 * Sorted extents → extents where touching neighbours of the same kind are joined. Overlapping extents are
 * kept apart (the hints consumer reads a block when any changed extent touches it).
 */
export function mergeExtents(sorted: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of sorted) {
    if (e.length === 0) continue;
    const last = out[out.length - 1];
    if (last && last.exists === e.exists && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/**
 * thin_delta XML (compact or `--verbose`) → byte extents that changed from the left device to the right
 * one: different/right_only → exists: true, left_only → exists: false (now zeros), adjacent merged.
 */
export function parseThinDelta(xml: string, chunkSizeBytes: number): Extent[] {
  return parseThinDeltaDocument(xml, chunkSizeBytes).extents;
}

/** Like parseThinDelta, also returning the compared device ids and the reported data block size. */
export function parseThinDeltaDocument(xml: string, chunkSizeBytes: number): ThinDelta {
  const p = new ThinDeltaParser(chunkSizeBytes);
  p.push(xml);
  return p.end();
}
