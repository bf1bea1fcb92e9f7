#!/bin/bash
# Cold sequential read of one version: `blocksafe mount` (dd of by_id/<id>/data) vs `blocksafe nbd`
# (nbdcopy to null:), with the server's CPU time. Needs root, /dev/fuse, nbdcopy. docs/MOUNT.md has results.
#   bash bench/mount-vs-nbd.sh [SIZE_MIB=512] [ROUNDS=3]
set -eu
cd "$(dirname "$0")/.."
SIZE=${1:-512}; ROUNDS=${2:-3}
N=node_modules/.bin/node; B=$PWD/bin/blocksafe.js
W=$(mktemp -d /tmp/blocksafe-mountbench-XXXXXX); trap 'rm -rf "$W"' EXIT
mkdir "$W/mnt"; head -c 64 /dev/urandom > "$W/key"; chmod 600 "$W/key"
(head -c $((SIZE / 2))M /dev/urandom; yes "blocksafe mount throughput line of text 0123456789" | head -c $((SIZE / 2))M) > "$W/img"
R=(--repo "$W/repo" --key-file "$W/key")
$N $B init "${R[@]}" >/dev/null
ID=$($N $B backup "${R[@]}" "$W/img" vol --json | sed -n 's/^  "id": "\(.*\)",$/\1/p')
rm "$W/img"
cpu() { awk '{printf "%.2f s", ($14+$15)/100}' "/proc/$1/stat"; }
rate() { echo "scale=1; $SIZE/($2-$1)" | bc; }
mountrun() {
  $N $B mount "${R[@]}" "$W/mnt" "$ID" >/dev/null 2>"$W/m.err" & local P=$!
  until grep -q " $W/mnt " /proc/self/mountinfo; do sleep 0.05; done
  local s; s=$(date +%s.%N); dd if="$W/mnt/by_id/$ID/data" of=/dev/null bs=1M "$@" 2>/dev/null; local e; e=$(date +%s.%N)
  echo "mount dd bs=1M $*: $(rate "$s" "$e") MiB/s, server CPU $(cpu $P)"
  kill -INT $P; wait $P
}
nbdrun() {
  $N $B nbd "${R[@]}" --socket "$W/s.sock" "$ID" >"$W/n.out" 2>"$W/n.err" & local P=$!
  until [ -S "$W/s.sock" ] && grep -q Serving "$W/n.out"; do sleep 0.05; done
  local s; s=$(date +%s.%N); nbdcopy "nbd+unix:///$ID?socket=$W/s.sock" null:; local e; e=$(date +%s.%N)
  echo "nbd nbdcopy: $(rate "$s" "$e") MiB/s, server CPU $(cpu $P)"
  kill -INT $P; wait $P
}
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do mountrun; nbdrun; mountrun iflag=direct; done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
