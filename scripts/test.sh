#!/usr/bin/env bash
# `npm test`: everything the test suite needs, set up here, then the suite itself.
#
# - Debian tools the tests drive (loop devices and filesystems, NBD clients, qemu-img, FUSE, tmux, thin
#   provisioning tools, psktool, debootstrap, ...): installed with apt-get when run as root, otherwise
#   named in one line with the command to install them.
# - A real Ceph cluster with a RADOS Gateway (S3) and an RBD pool, from ../shared/services/radosgw (beside
#   this checkout): started here unless one answers already (BLOCKSAFE_TEST_S3_ENDPOINT), and stopped when
#   this script ends, whatever happens.
# - The single executable (the tmux and binary tests run it as on a rescue system), with its lmdb addon
#   built in a cached Debian 11 root so that it runs on glibc 2.31.
# Extra arguments go to ava (e.g. `npm test -- test/roundtrip.test.ts`).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need=()
for tool in e2fsck:e2fsprogs debugfs:e2fsprogs mkfs.ext4:e2fsprogs losetup:mount tmux:tmux python3:python3 stty:coreutils \
  fincore:util-linux unshare:util-linux setpriv:util-linux flock:util-linux runuser:util-linux \
  thin_delta:thin-provisioning-tools thin_restore:thin-provisioning-tools nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin \
  qemu-img:qemu-utils qemu-io:qemu-utils fusermount3:fuse3 debootstrap:debootstrap useradd:passwd cc:gcc strip:binutils \
  psktool:gnutls-bin curl:curl radosgw:radosgw ceph-mon:ceph-mon ceph-osd:ceph-osd rbd:ceph-common; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  if [ "$(id -u)" -ne 0 ]; then
    echo "npm test: missing Debian packages; install them first: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "npm test: installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
fi

# The S3 and RBD tests need the gateway; it is ours to stop only if we started it.
export BLOCKSAFE_TEST_S3_ACCESS_KEY="${BLOCKSAFE_TEST_S3_ACCESS_KEY:-TESTKEY}" BLOCKSAFE_TEST_S3_SECRET_KEY="${BLOCKSAFE_TEST_S3_SECRET_KEY:-TESTSECRET}"
export BLOCKSAFE_TEST_S3_REGION="${BLOCKSAFE_TEST_S3_REGION:-us-east-1}"
export BLOCKSAFE_TEST_RGW_DIR="${BLOCKSAFE_TEST_RGW_DIR:-/tmp/blocksafe-test-rgw}"
port="${RGW_PORT:-7480}"
export BLOCKSAFE_TEST_S3_ENDPOINT="${BLOCKSAFE_TEST_S3_ENDPOINT:-http://127.0.0.1:$port}"
if ! curl -s -o /dev/null --max-time 3 "$BLOCKSAFE_TEST_S3_ENDPOINT/"; then
  rgw_sh="$(cd ../shared/services/radosgw 2>/dev/null && pwd || true)"
  if [ -z "$rgw_sh" ]; then
    echo "npm test: no S3 gateway at $BLOCKSAFE_TEST_S3_ENDPOINT and no ../shared/services/radosgw beside this checkout to start one." >&2
    exit 1
  fi
  trap 'D="$BLOCKSAFE_TEST_RGW_DIR" bash "$rgw_sh/down.sh" >/dev/null 2>&1 || true' EXIT
  D="$BLOCKSAFE_TEST_RGW_DIR" RGW_PORT="$port" bash "$rgw_sh/up.sh"
fi

npm run build
# The single executable, built on the pinned Node with an lmdb addon for glibc 2.31 (roots cached in
# /var/cache/blocksafe, about 2 minutes when cold).
if [ "$(id -u)" -eq 0 ]; then
  build/compat/debian-root.sh bullseye >/dev/null
  node build/build-binary.mjs --compat --max-glibc=2.31
else
  node build/build-binary.mjs # without root there is no Debian 11 root: the binary needs this system's glibc
fi
export BLOCKSAFE_BIN="${BLOCKSAFE_BIN:-build/out/blocksafe}"
npx ava "$@"
