#!/usr/bin/env bash
# Installs what pen needs on a Debian/Ubuntu host, once: QEMU (with virtiofsd), mmdebstrap
# and squashfs tools; tmux for the test suite, which drives terminals with it. Uses the
# host's own apt configuration; safe to run again.
set -euo pipefail

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
packages=(qemu-system-x86 qemu-system-common mmdebstrap squashfs-tools-ng e2fsprogs tmux)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "host packages: all present"; exit 0; }

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
extra=()
# A qemu-utils newer than the release's QEMU (from backports) blocks installing
# qemu-system-x86: take qemu-utils from the release itself so the two match.
if dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -q "ok installed"; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  installed=$(dpkg-query -W -f='${Version}' qemu-utils)
  candidate=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  if [ -n "$codename" ] && dpkg --compare-versions "$installed" gt "$candidate"; then
    extra+=("qemu-utils/$codename")
  fi
fi
$sudo apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" "${extra[@]}"
