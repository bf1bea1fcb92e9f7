/**
 * Source patches applied while bundling. Every patch names the exact text it expects; when a dependency
 * upgrade changes that text the build stops with an error that says which file and which patch, instead of
 * producing a binary that fails at run time on someone's rescue system.
 */

export class PatchError extends Error {
  constructor(message) {
    super(message);
    this.name = 'PatchError';
  }
}

/**
 * Replaces `search` (a string, must occur exactly `count` times, default once) or a RegExp (must match
 * exactly `count` times) in `text`. `label` names the patch in errors.
 */
export function replaceExactly(text, search, replacement, { file, label, count = 1 }) {
  let found;
  if (typeof search === 'string') {
    found = text.split(search).length - 1;
  } else {
    const flags = search.flags.includes('g') ? search.flags : `${search.flags}g`;
    found = [...text.matchAll(new RegExp(search.source, flags))].length;
  }
  if (found !== count) {
    throw new PatchError(
      `patch "${label}" no longer applies to ${file}: expected ${count} occurrence(s) of ${describe(search)}, found ${found}. ` +
        'A dependency was probably upgraded: update build/lib/plugins.mjs (see docs/BINARY.md, "Patches").',
    );
  }
  // Functions and split/join so that "$" in a replacement is never read as a back-reference.
  if (typeof search === 'string') return text.split(search).join(typeof replacement === 'function' ? replacement(search) : replacement);
  const flags = search.flags.includes('g') ? search.flags : `${search.flags}g`;
  return text.replace(new RegExp(search.source, flags), typeof replacement === 'function' ? replacement : () => replacement);
}

function describe(search) {
  const s = typeof search === 'string' ? JSON.stringify(search) : String(search);
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}
