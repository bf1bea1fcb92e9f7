#!/usr/bin/env bash
# Prints the path of a cached Debian root for SUITE, creating it when missing (root, debootstrap, a Debian
# mirror). Used to build native addons against an old glibc (build/compat/lmdb-addon.mjs) and to run the
# single executable on an old system (test/binary-oldglibc.test.ts). See docs/BINARY.md.
#
#   build/compat/debian-root.sh SUITE [PACKAGE...]
#
# Without packages: `debootstrap --variant=minbase SUITE` as is (what the rescue-system test runs in).
# With packages: a copy of that root with them installed by apt (e.g. g++ make python3 to build addons).
#
# Cache: ${BLOCKSAFE_COMPAT_CACHE:-/var/cache/blocksafe}/roots/<suite>-minbase[+pkg,pkg]; downloaded .debs in
# .../debs (so a rebuild after `rm -rf roots` downloads little). A root is complete when it holds
# .blocksafe-root-ok; it is built under a temporary name and renamed, under a per-root flock, so
# concurrent runs on one machine wait for each other and an interrupted build is redone.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 SUITE [PACKAGE...]" >&2; exit 2; }
suite=$1
shift
pkgs=("$@")
cache=${BLOCKSAFE_COMPAT_CACHE:-/var/cache/blocksafe}
mirror=${BLOCKSAFE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
name="$suite-minbase"
if [ ${#pkgs[@]} -gt 0 ]; then
  name="$name+$(printf '%s\n' "${pkgs[@]}" | sort -u | paste -sd, -)"
fi
dir="$cache/roots/$name"
if [ -f "$dir/.blocksafe-root-ok" ]; then
  echo "$dir"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "$0: building $dir needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$cache/roots" "$cache/debs"
chmod 0755 "$cache" "$cache/roots"
exec 9>"$dir.lock"
flock 9
if [ -f "$dir/.blocksafe-root-ok" ]; then
  echo "$dir"
  exit 0
fi
started=$(date +%s)
rm -rf "$dir" "$dir".tmp-*
tmp="$dir.tmp-$$"
if [ ${#pkgs[@]} -eq 0 ]; then
  command -v debootstrap >/dev/null || { echo "$0: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  echo "debian-root: debootstrap --variant=minbase $suite (about 75-90 s)" >&2
  if ! debootstrap --variant=minbase --cache-dir="$cache/debs" "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1; then
    tail -n 20 "$tmp.log" >&2
    rm -rf "$tmp"
    echo "$0: debootstrap of $suite from $mirror failed (log above)" >&2
    exit 1
  fi
  rm -f "$tmp.log"
else
  base=$("$0" "$suite")
  echo "debian-root: $suite + ${pkgs[*]}" >&2
  cp -a "$base" "$tmp"
  rm -f "$tmp/.blocksafe-root-ok"
  cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
  mkdir -p "$tmp/var/cache/apt/archives"
  # apt in a private mount namespace with /proc, its downloads kept in the shared .deb cache.
  if ! unshare -m --propagation private sh -ec '
      root=$1; debs=$2; shift 2
      mount -t proc proc "$root/proc"
      mount --bind "$debs" "$root/var/cache/apt/archives"
      chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive apt-get -qq update
      chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        apt-get -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 install "$@"
    ' sh "$tmp" "$cache/debs" "${pkgs[@]}" >"$tmp.log" 2>&1; then
    tail -n 20 "$tmp.log" >&2
    rm -rf "$tmp"
    echo "$0: installing ${pkgs[*]} into the $suite root failed (log above)" >&2
    exit 1
  fi
  rm -f "$tmp.log"
fi
glibc=$(chroot "$tmp" ldd --version 2>/dev/null | awk 'NR == 1 { print $NF }' || true)
[ -n "$glibc" ] || { echo "$0: no ldd --version in the $suite root" >&2; exit 1; }
printf 'suite=%s\npackages=%s\nglibc=%s\ncreated=%s\nseconds=%s\n' "$suite" "${pkgs[*]}" "$glibc" "$(date -Is)" "$(($(date +%s) - started))" >"$tmp/.blocksafe-root-ok"
mv "$tmp" "$dir"
echo "debian-root: $dir ready (glibc $glibc) in $(($(date +%s) - started)) s" >&2
echo "$dir"
