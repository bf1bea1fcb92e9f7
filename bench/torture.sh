#!/usr/bin/env bash
# The long torture run (issue 15; docs/TORTURE.md): seeded random schedules of backups, restores, removals,
# cleanups, rekeys, copies and index rebuilds under injected faults and power losses, each followed by the
# invariant checker. Usage: bash bench/torture.sh --schedules N [--seed S] [--parallel P] [--bin path/to/blocksafe.js]
# Ends with exactly one line: "torture: N schedules, F faults injected, V violations"; exit 1 when V > 0.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f dist/src/cli/run.js ] || npm run build >/dev/null
export PATH="$PWD/node_modules/.bin:$PATH"
exec node --import=tsx test/torture/main.ts "$@"
