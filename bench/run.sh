#!/usr/bin/env bash
# blocksafe vs restic vs borg on the same generated images (see bench/README.md).
# Run through `npm run bench` (which builds first) or `bash bench/run.sh` after `npm run build`.
#
# Environment:
#   BENCH_SIZE     image size for mkimage.py (default 1G)
#   BENCH_RUNS     measurements per step; the table shows medians (default 1)
#   BENCH_TOOLS    tools to run (default "blocksafe restic borg-lz4 borg-zstd")
#   BENCH_MKIMAGE  path of mkimage.py (default ../shared/bench/mkimage.py, relative to the repo root)
#   BENCH_WORK     work directory (default bench/work; images are kept and reused there)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SIZE=${BENCH_SIZE:-1G}
RUNS=${BENCH_RUNS:-1}
TOOLS=${BENCH_TOOLS:-blocksafe restic borg-lz4 borg-zstd}
MKIMAGE=${BENCH_MKIMAGE:-$ROOT/../shared/bench/mkimage.py}
WORK=${BENCH_WORK:-$ROOT/bench/work}
PASS=bench-passphrase-not-secret
BLOCKSAFE=(node "$ROOT/bin/blocksafe.js")

die() { echo "bench: error: $*" >&2; exit 1; }
note() { echo "bench: $*" >&2; }

# ------------------------------------------------------------------ prerequisites
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer (got '$RUNS')"
command -v python3 >/dev/null || die "python3 is required by mkimage.py (apt-get install -y python3)"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing: apt-get update -qq && apt-get install -y -qq time"
[[ -f $MKIMAGE ]] || die "mkimage.py not found at $MKIMAGE (set BENCH_MKIMAGE)"
[[ -f $ROOT/dist/src/cli/run.js ]] || die "blocksafe is not built: run 'npm run build' (or use 'npm run bench')"
command -v sha256sum >/dev/null || die "sha256sum (coreutils) is required"

selected=()
for t in $TOOLS; do
  case $t in
    blocksafe) selected+=("$t") ;;
    restic)
      if command -v restic >/dev/null; then selected+=("$t")
      else note "restic not found, skipping it (install: apt-get update -qq && apt-get install -y -qq restic)"; fi ;;
    borg-lz4|borg-zstd)
      if command -v borg >/dev/null; then selected+=("$t")
      else note "borg not found, skipping $t (install: apt-get update -qq && apt-get install -y -qq borgbackup)"; fi ;;
    *) die "unknown tool '$t' in BENCH_TOOLS (known: blocksafe restic borg-lz4 borg-zstd)" ;;
  esac
done
((${#selected[@]})) || die "no tool to run"

# Does this build of blocksafe have incremental backups with hints?
HINTS_SUPPORTED=-1 # -1: blocksafe not run, 0: no --hints, 1: measured
if [[ " ${selected[*]} " == *" blocksafe "* ]]; then
  help_text=$("${BLOCKSAFE[@]}" backup --help 2>&1) \
    || note "warning: 'blocksafe backup --help' failed (dist/ being rebuilt?): $(head -n 3 <<<"$help_text")"
  HINTS_SUPPORTED=0
  if grep -q -- --hints <<<"$help_text" && grep -q -- --from <<<"$help_text"; then
    HINTS_SUPPORTED=1
    selected+=(blocksafe-hints)
  else
    note "blocksafe backup has no --hints/--from yet: skipping the hinted incremental"
  fi
fi

# ------------------------------------------------------------------ images
IMGDIR=$WORK/images
mkdir -p "$IMGDIR"
BASE=$IMGDIR/base-$SIZE-seed1.img
MUT=$IMGDIR/mut-$SIZE-seed1-seed2.img
HINTS=$MUT.hints.json

if [[ ! -f $BASE ]]; then
  note "generating $BASE ($SIZE, seed 1)"
  rm -f "$BASE.tmp"
  python3 "$MKIMAGE" gen --out "$BASE.tmp" --size "$SIZE" --seed 1 --manifest "$BASE.manifest.json" >/dev/null
  mv "$BASE.tmp" "$BASE"
  rm -f "$MUT" "$HINTS" "$MUT.sha256"
else
  note "reusing $BASE"
fi
if [[ ! -f $MUT || ! -f $HINTS ]]; then
  note "generating $MUT (mutate 1 % in 64 KiB regions, seed 2) and hints"
  rm -f "$MUT.tmp" "$MUT" "$MUT.sha256"
  python3 "$MKIMAGE" mutate --base "$BASE" --out "$MUT.tmp" --seed 2 --fraction 0.01 --region 64K \
    --hints "$HINTS" >"$MUT.mutate.json"
  mv "$MUT.tmp" "$MUT"
else
  note "reusing $MUT"
fi
if [[ ! -s $MUT.sha256 ]]; then
  sha256sum "$MUT" | cut -d' ' -f1 >"$MUT.sha256"
fi
MUT_SHA=$(<"$MUT.sha256")
IMG_BYTES=$(stat -L -c %s "$BASE")

# ------------------------------------------------------------------ measurement
RESDIR=$WORK/results
SCRATCH=$WORK/scratch
rm -rf "$RESDIR" "$SCRATCH"
mkdir -p "$RESDIR/logs" "$SCRATCH"
TSV=$RESDIR/measurements.tsv
printf 'tool\tstep\trun\twall_s\tuser_s\tsys_s\tmaxrss_kib\trepo_bytes\tstatus\n' >"$TSV"

cleanup() { rm -rf "$SCRATCH"; }
trap cleanup EXIT

record() { # tool step run wall user sys rss repo status
  local IFS=$'\t'
  echo "$*" >>"$TSV"
}

# measure [-i STDIN_FILE] [-C DIR] TOOL STEP RUN -- COMMAND...
# Times COMMAND with /usr/bin/time; its stdout is kept in $LAST_OUT.
LAST_OUT=
measure() {
  local in=/dev/null dir=$PWD
  while [[ $1 == -* ]]; do
    case $1 in
      -i) in=$2; shift 2 ;;
      -C) dir=$2; shift 2 ;;
      *) die "measure: bad option $1" ;;
    esac
  done
  local tool=$1 step=$2 run=$3
  shift 4 # includes the --
  local base=$RESDIR/logs/$tool.$step.run$run
  local tf=$base.time
  LAST_OUT=$base.out
  note "  $tool $step (run $run)"
  # flush dirty pages of earlier steps (repos, restored images) so their writeback is not billed here;
  # the page cache itself stays warm
  sync
  local rc=0
  (cd "$dir" && exec /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" <"$in" >"$base.out" 2>"$base.err") || rc=$?
  if ((rc != 0)); then
    note "  FAILED: $tool $step exited with $rc; last lines of $base.err:"
    tail -n 15 "$base.err" | sed 's/^/    | /' >&2
    record "$tool" "$step" "$run" "" "" "" "" "" "fail:exit $rc"
    return 1
  fi
  local wall user sys rss
  read -r wall user sys rss < <(tail -n 1 "$tf")
  record "$tool" "$step" "$run" "$wall" "$user" "$sys" "$rss" "" ok
}

repo_size() { # tool step run repo
  local bytes
  bytes=$(du -sb "$4" | cut -f1)
  record "$1" "$2" "$3" "" "" "" "" "$bytes" ok
}

verify() { # tool run file
  local got
  if [[ ! -f $3 ]]; then
    note "  FAILED: $1 restore did not create $3"
    record "$1" verify "$2" "" "" "" "" "" "fail:restored file missing"
    return 1
  fi
  got=$(sha256sum "$3" | cut -d' ' -f1)
  if [[ $got != "$MUT_SHA" ]]; then
    note "  FAILED: $1 restore differs from the source image (sha256 $got, expected $MUT_SHA)"
    record "$1" verify "$2" "" "" "" "" "" "fail:sha256 mismatch"
    return 1
  fi
  record "$1" verify "$2" "" "" "" "" "" ok
}

json_id() { # tool step run file -> .id of the JSON object blocksafe printed
  node -e 'const o = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); if (!o.id) process.exit(1); console.log(o.id)' "$4" 2>/dev/null \
    || { note "  FAILED: $1 $2 printed no JSON object with an id (see $4)"; record "$1" "$2" "$3" "" "" "" "" "" "fail:no id in --json output"; return 1; }
}

# ---- blocksafe (encryption chacha20-poly1305 + zstd: the defaults)
flow_blocksafe() {
  local run=$1 d=$SCRATCH/blocksafe
  rm -rf "$d" "$SCRATCH/blocksafe-hints"
  mkdir -p "$d"
  local repo=$d/repo
  BLOCKSAFE_PASSPHRASE=$PASS "${BLOCKSAFE[@]}" init --repo "$repo" >"$RESDIR/logs/blocksafe.init.run$run.log" 2>&1 \
    || { cat "$RESDIR/logs/blocksafe.init.run$run.log" >&2; record blocksafe backup1 "$run" "" "" "" "" "" "fail:init"; return 1; }
  measure blocksafe backup1 "$run" -- env BLOCKSAFE_PASSPHRASE="$PASS" "${BLOCKSAFE[@]}" backup --repo "$repo" --json "$BASE" bench
  local id1
  id1=$(json_id blocksafe backup1 "$run" "$LAST_OUT")
  repo_size blocksafe backup1 "$run" "$repo"
  if ((HINTS_SUPPORTED)); then
    # same first version for the hinted incremental, done later on a copy
    mkdir -p "$SCRATCH/blocksafe-hints"
    cp -a "$repo" "$SCRATCH/blocksafe-hints/repo"
    echo "$id1" >"$SCRATCH/blocksafe-hints/id1"
  fi
  measure blocksafe backup2 "$run" -- env BLOCKSAFE_PASSPHRASE="$PASS" "${BLOCKSAFE[@]}" backup --repo "$repo" --json "$MUT" bench
  local id2
  id2=$(json_id blocksafe backup2 "$run" "$LAST_OUT")
  repo_size blocksafe backup2 "$run" "$repo"
  measure blocksafe restore "$run" -- env BLOCKSAFE_PASSPHRASE="$PASS" "${BLOCKSAFE[@]}" restore --repo "$repo" "$id2" "$d/restored.img"
  verify blocksafe "$run" "$d/restored.img"
  rm -rf "$d"
}

flow_blocksafe-hints() {
  local run=$1 d=$SCRATCH/blocksafe-hints
  [[ -f $d/id1 ]] || { note "  blocksafe-hints: no first version (blocksafe backup 1 failed?)"; return 1; }
  local repo=$d/repo id1
  id1=$(<"$d/id1")
  measure blocksafe-hints backup2 "$run" -- env BLOCKSAFE_PASSPHRASE="$PASS" "${BLOCKSAFE[@]}" backup --repo "$repo" --json \
    --from "$id1" --hints "$HINTS" "$MUT" bench
  local id2
  id2=$(json_id blocksafe-hints backup2 "$run" "$LAST_OUT")
  repo_size blocksafe-hints backup2 "$run" "$repo"
  measure blocksafe-hints restore "$run" -- env BLOCKSAFE_PASSPHRASE="$PASS" "${BLOCKSAFE[@]}" restore --repo "$repo" "$id2" "$d/restored.img"
  verify blocksafe-hints "$run" "$d/restored.img"
  rm -rf "$d"
}

# ---- restic (--stdin, repository v2, compression auto, AES-256-CTR + Poly1305)
flow_restic() {
  local run=$1 d=$SCRATCH/restic
  rm -rf "$d"
  mkdir -p "$d/restore"
  export RESTIC_PASSWORD=$PASS RESTIC_CACHE_DIR=$d/cache
  local repo=$d/repo
  restic init --repo "$repo" --repository-version 2 >"$RESDIR/logs/restic.init.run$run.log" 2>&1 \
    || { cat "$RESDIR/logs/restic.init.run$run.log" >&2; record restic backup1 "$run" "" "" "" "" "" "fail:init"; return 1; }
  measure -i "$BASE" restic backup1 "$run" -- restic backup --repo "$repo" --compression auto --stdin --stdin-filename disk.img
  repo_size restic backup1 "$run" "$repo"
  measure -i "$MUT" restic backup2 "$run" -- restic backup --repo "$repo" --compression auto --stdin --stdin-filename disk.img
  repo_size restic backup2 "$run" "$repo"
  measure restic restore "$run" -- restic restore latest --repo "$repo" --target "$d/restore"
  verify restic "$run" "$d/restore/disk.img"
  rm -rf "$d"
}

# ---- borg (repokey-blake2, -C lz4 or -C zstd,3), image on stdin, archived as disk.img both times
flow_borg() { # compression tool run
  local comp=$1 tool=$2 run=$3 d=$SCRATCH/$2
  rm -rf "$d"
  mkdir -p "$d/restore" "$d/base"
  export BORG_PASSPHRASE=$PASS BORG_BASE_DIR=$d/base
  local repo=$d/repo
  borg init -e repokey-blake2 "$repo" >"$RESDIR/logs/$tool.init.run$run.log" 2>&1 \
    || { cat "$RESDIR/logs/$tool.init.run$run.log" >&2; record "$tool" backup1 "$run" "" "" "" "" "" "fail:init"; return 1; }
  measure -i "$BASE" "$tool" backup1 "$run" -- borg create -C "$comp" --stdin-name disk.img "$repo::v1" -
  repo_size "$tool" backup1 "$run" "$repo"
  measure -i "$MUT" "$tool" backup2 "$run" -- borg create -C "$comp" --stdin-name disk.img "$repo::v2" -
  repo_size "$tool" backup2 "$run" "$repo"
  measure -C "$d/restore" "$tool" restore "$run" -- borg extract --sparse "$repo::v2"
  verify "$tool" "$run" "$d/restore/disk.img"
  rm -rf "$d"
}
flow_borg-lz4() { flow_borg lz4 borg-lz4 "$1"; }
flow_borg-zstd() { flow_borg zstd,3 borg-zstd "$1"; }

# ------------------------------------------------------------------ run
# Median wall-clock ms of 9 runs of `"$@" --version`: start-up time (measured here, not asserted by a test).
startup_ms() {
  local i s e times=()
  for i in 1 2 3 4 5 6 7 8 9; do
    s=$(date +%s%N); "$@" --version >/dev/null 2>&1; e=$(date +%s%N)
    times+=($(((e - s) / 1000000)))
  done
  printf '%s\n' "${times[@]}" | sort -n | sed -n 5p
}
versions() {
  echo "node $(node --version)"
  echo "blocksafe $("${BLOCKSAFE[@]}" --version 2>/dev/null || echo '?') (--version start-up: median $(startup_ms "${BLOCKSAFE[@]}") ms)"
  [[ -x $ROOT/build/out/blocksafe ]] && echo "single executable --version start-up: median $(startup_ms "$ROOT/build/out/blocksafe") ms"
  command -v restic >/dev/null && restic version | head -n 1
  command -v borg >/dev/null && borg --version
  true
}
VERSIONS=$(versions)
# blocksafe's effective settings (block size, zstd level, threads, direct_io...), for the report
BS_CONFIG=
if [[ " ${selected[*]} " == *" blocksafe "* ]]; then
  BS_CONFIG=$("${BLOCKSAFE[@]}" config 2>/dev/null | grep -v '^[#[]' | grep '=' | sed 's/ *= */=/' || true)
fi

note "image: $BASE ($IMG_BYTES bytes), mutated: $MUT; runs: $RUNS; tools: ${selected[*]}"
note "warm page cache (dropping it is not possible here); shared $(nproc)-core VM"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# blocksafe-hints needs blocksafe's first version: it always runs last; the others rotate between runs
order=()
for t in "${selected[@]}"; do [[ $t == blocksafe-hints ]] || order+=("$t"); done
failed=()
for ((run = 1; run <= RUNS; run++)); do
  # warm: every tool reads the images from the page cache
  cat "$BASE" "$MUT" >/dev/null
  k=$(((run - 1) % ${#order[@]}))
  this_run=("${order[@]:k}" "${order[@]:0:k}")
  ((HINTS_SUPPORTED == 1)) && this_run+=(blocksafe-hints)
  for tool in "${this_run[@]}"; do
    note "run $run/$RUNS: $tool"
    set +e
    (set -e; "flow_$tool" "$run")
    rc=$?
    set -e
    if ((rc != 0)); then
      note "$tool: run $run failed (see $RESDIR/logs)"
      failed+=("$tool/run$run")
    fi
  done
done
rm -rf "$SCRATCH"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

node "$ROOT/bench/report.mjs" \
  --tsv "$TSV" --out "$WORK/results.json" --image-bytes "$IMG_BYTES" --size "$SIZE" --runs "$RUNS" \
  --hints-supported "$HINTS_SUPPORTED" --versions "$VERSIONS" --mutate "$MUT.mutate.json" --nproc "$(nproc)" --logs "$RESDIR/logs" \
  --blocksafe-config "$BS_CONFIG" --load "$LOAD_BEFORE / $LOAD_AFTER"

if ((${#failed[@]})); then
  die "some steps failed: ${failed[*]} (logs in $RESDIR/logs)"
fi
