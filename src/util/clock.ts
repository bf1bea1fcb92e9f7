/**
 * The wall clock of decisions that depend on elapsed time (cleanup grace periods, lock heartbeats). Tests
 * move it forward with BLOCKSAFE_TEST_CLOCK_OFFSET (milliseconds) instead of waiting: a fake clock,
 * deliberately named so nobody sets it by accident.
 */
const offset = Number(process.env.BLOCKSAFE_TEST_CLOCK_OFFSET ?? 0) || 0;

export function now(): number {
  return Date.now() + offset;
}
