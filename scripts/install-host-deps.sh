#!/usr/bin/env bash
# Installs what pen needs on a Debian/Ubuntu host, once, for an ordinary user: QEMU,
# mmdebstrap with `uidmap` (its unprivileged "unshare" mode), squashfs tools, tmux (the test
# suite drives terminals with it), iproute2 (the network tests build a LAN in namespaces),
# and a virtiofsd that runs without root.
#
# `sudo` is used for apt-get only, and only when a package is missing. Everything else runs
# as you: where the distribution has no package of the Rust virtiofsd (Debian 12), it is
# built with `cargo install` into ~/.local/bin, where pen finds it.
# Uses the host's own apt configuration; safe to run again.
#
# PEN_DEPS_SYSTEM_ONLY=1 installs the system packages and stops (CI runs that part as root,
# then the rest as the user who runs the tests).
set -euo pipefail

# The Rust virtiofsd release built where no package exists (its MSRV is met by stable Rust).
VIRTIOFSD_VERSION=1.14.0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
packages=(qemu-system-x86 qemu-system-common mmdebstrap squashfs-tools-ng e2fsprogs uidmap tmux iproute2)

# A packaged Rust virtiofsd (Debian 13, Ubuntu 24.04) when the archive has one; otherwise
# what building it needs.
has_candidate() {
  local c
  c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$c" ] && [ "$c" != "(none)" ]
}
if has_candidate virtiofsd; then
  packages+=(virtiofsd)
else
  packages+=(libseccomp-dev libcap-ng-dev pkg-config)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "host packages: all present"
else
  export DEBIAN_FRONTEND=noninteractive
  [ -n "$sudo" ] && echo "installing with sudo apt-get: ${missing[*]}"
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
fi

[ "${PEN_DEPS_SYSTEM_ONLY:-}" = 1 ] && exit 0

# The Rust virtiofsd, as the user, where no package provides one. pen looks for it in
# /usr/libexec, ~/.local/bin, beside pen itself and in PATH (`pen doctor` says which).
if [ -x /usr/libexec/virtiofsd ] || [ -x "$HOME/.local/bin/virtiofsd" ]; then
  echo "virtiofsd: present"
else
  echo "building virtiofsd $VIRTIOFSD_VERSION into ~/.local/bin (about two minutes, once)"
  cargo install --quiet --locked --root "$HOME/.local" "virtiofsd@$VIRTIOFSD_VERSION"
fi
