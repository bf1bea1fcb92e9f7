#!/usr/bin/env bash
# The main job on an embedded default: generate a disk image, back it up twice (the second time after a
# change), restore the second version and verify it byte for byte. Everything happens in a temp folder.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/blocksafe-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
bs() { node bin/blocksafe.js "$@"; }
export BLOCKSAFE_PASSPHRASE=demo-passphrase

echo "== generating a 64 MiB disk image (zeros, random, text, duplicates)"
node scripts/mkdemoimage.mjs "$work/disk.img" 64

echo "== blocksafe init"
bs init --repo "$work/repo"
echo "== first backup"
v1=$(bs backup --repo "$work/repo" "$work/disk.img" demo-disk)
echo "== changing 1 MiB of the image, second backup (only changed blocks are written)"
dd if=/dev/urandom of="$work/disk.img" bs=1M count=1 seek=20 conv=notrunc status=none
v2=$(bs backup --repo "$work/repo" "$work/disk.img" demo-disk)
bs ls --repo "$work/repo"
echo "== restoring $v2"
bs restore --repo "$work/repo" "$v2" "$work/restored.img"
a=$(sha256sum < "$work/disk.img"); b=$(sha256sum < "$work/restored.img")
if [ "$a" = "$b" ]; then echo "== OK: restored image is identical (sha256 ${a%% *})"; else echo "== FAILED: restored image differs"; exit 1; fi
bs stats --repo "$work/repo"
echo "(first version was $v1)"
