/** Progress of a long operation, reported to the CLI's progress line or the TUI. */
export interface Progress {
  phase: string;
  doneBytes: number;
  totalBytes: number;
  /** Damaged ranges found so far (restore, scrub). */
  damaged: number;
}
export type ProgressListener = (p: Progress) => void;
