/** Types for elf.mjs (the tests import compareVersions). */
export function compareVersions(a: string, b: string): number;
export function symbolVersionNeeds(file: string): { glibc: string | undefined; glibcxx: string | undefined; needed: string[] };
