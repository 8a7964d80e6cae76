#!/usr/bin/env bash
# Profile benchmark (see bench/README.md, "Profiles"):
#   * the time to build the image of examples/profiles/small.toml from scratch (builder VM:
#     boot, apt-get update, install, build script, clean, stream the root, pack it);
#   * that image's size, next to the base root's;
#   * cold `pen exec --profile small NAME -- true` (a stopped VM made from the profile) against
#     cold `pen exec NAME -- true` on the base image, alternated in the same run so that a
#     change in the host's load hits both alike; medians over REPS.
#
# Usage: bench/profile.sh [--pen PATH] [--reps N] [--images DIR]
#   --pen     the pen binary (default: target/release/pen, built if missing)
#   --reps    repetitions of each cold start (default 5)
#   --images  a directory holding a built base image (base.json, vmlinuz, initrd, rootfs.sqfs,
#             modules/); hard-linked, never written. Default: $PEN_HOME/images or
#             ~/.config/pen/images when built there; otherwise the base image is built first.
#
# Everything lives in a private PEN_HOME under $TMPDIR, removed at the end: the profile image
# is built there, so no image of the user's is touched or reused.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
pen="$repo/target/release/pen"
reps=5
images=""
while [ $# -gt 0 ]; do
    case "$1" in
        --pen) pen=$2; shift 2 ;;
        --reps) reps=$2; shift 2 ;;
        --images) images=$2; shift 2 ;;
        *) echo "usage: bench/profile.sh [--pen PATH] [--reps N] [--images DIR]" >&2; exit 2 ;;
    esac
done
if [ -z "$images" ]; then
    for dir in "${PEN_HOME:-}/images" "$HOME/.config/pen/images"; do
        if [ -f "$dir/base.json" ]; then images=$dir; break; fi
    done
fi
if [ ! -x "$pen" ]; then
    echo "profile.sh: building $pen" >&2
    (cd "$repo" && cargo build --release -p pen >&2)
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/pen-bench-profile.XXXXXX")
export PEN_HOME="$root/home"
ws="$root/ws"
mkdir -p "$PEN_HOME/profiles" "$PEN_HOME/images" "$ws"
cleanup() {
    for vm in bbase bsmall; do
        "$pen" stop --force "$vm" >/dev/null 2>&1 || true
    done
    rm -rf "$root"
}
trap cleanup EXIT

if [ -n "$images" ]; then
    # Hard links: a private images directory (the profile image lands in it) without copying
    # the base image. pen replaces image files by rename, so the originals stay as they are.
    cp -al "$images"/base.json "$images"/vmlinuz "$images"/initrd "$images"/rootfs.sqfs \
        "$images"/modules "$PEN_HOME/images/"
else
    echo "profile.sh: no base image given; building one (minutes)" >&2
    "$pen" image build --base >&2
fi
cp "$repo/examples/profiles/small.toml" "$PEN_HOME/profiles/small.toml"

now() { date +%s.%N; }
# Seconds taken by `pen ARGS...` (its output goes to the log; a failure stops the benchmark).
timed() {
    local start end
    start=$(now)
    if ! "$pen" "$@" >>"$root/log" 2>&1; then
        echo "profile.sh: pen $* failed; its output:" >&2
        tail -n 30 "$root/log" >&2
        exit 1
    fi
    end=$(now)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m }'; }
# A finished exec's VM powers off by itself; the next cold start waits for that.
wait_stopped() {
    for _ in $(seq 600); do
        if [ "$("$pen" list | awk -v n="$1" '$1 == n { print $3 }')" = stopped ]; then return; fi
        sleep 0.2
    done
    echo "profile.sh: VM $1 did not stop" >&2
    exit 1
}
size_of() { stat -c %s "$1"; }
human() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

flags=(--dir "$ws" --cpus "$(nproc)" --memory 1024)
echo "profile.sh: building the small profile's image (pen $("$pen" version | cut -d' ' -f2))" >&2
build_s=$(timed image build small)
steps=$(grep -E '^pen: (step .* ended|packed the image)' "$PEN_HOME/images/profiles/small/build.log" || true)
image_bytes=$(size_of "$PEN_HOME/images/profiles/small/rootfs.sqfs")
base_bytes=$(size_of "$PEN_HOME/images/rootfs.sqfs")

# First boots: overlay format (and the profile's setup); reported, not in the medians.
echo "profile.sh: first boots" >&2
first_base=$(timed exec bbase "${flags[@]}" -- true)
first_small=$(timed exec bsmall --profile small "${flags[@]}" -- true)
wait_stopped bbase
wait_stopped bsmall
if ! "$pen" exec bsmall -- jq --version >>"$root/log" 2>&1; then
    echo "profile.sh: jq is missing from the small profile's VM" >&2
    exit 1
fi
wait_stopped bsmall

base_runs=""
small_runs=""
for i in $(seq "$reps"); do
    echo "profile.sh: cold starts, round $i of $reps" >&2
    base_runs="$base_runs $(timed exec bbase -- true)"
    wait_stopped bbase
    small_runs="$small_runs $(timed exec bsmall --profile small -- true)"
    wait_stopped bsmall
done
echo "profile.sh: base cold starts:${base_runs}" >&2
echo "profile.sh: small cold starts:${small_runs}" >&2

accel=$(grep -o 'accel [a-z]*' "$PEN_HOME/vms/bsmall/supervisor.log" | head -n1 | cut -d' ' -f2 || true)
[ -n "$accel" ] || accel=$(grep -q 'using TCG' "$root/log" && echo tcg || echo kvm)
printf '\n%s, %s CPUs, %s, %s reps\n\n' "$(date -u +%Y-%m-%d)" "$(nproc)" "$accel" "$reps"
printf '| measurement | value |\n|---|---|\n'
printf '| build of examples/profiles/small.toml (from scratch) | %.1f s |\n' "$build_s"
printf '| small profile image (rootfs.sqfs) | %s |\n' "$(human "$image_bytes")"
printf '| base image root (rootfs.sqfs) | %s |\n' "$(human "$base_bytes")"
printf '| first boot, base (overlay format) | %.2f s |\n' "$first_base"
printf '| first boot, small (overlay format + setup) | %.2f s |\n' "$first_small"
printf '| cold `pen exec NAME -- true`, base image (median) | %s s |\n' "$(echo "$base_runs" | median)"
printf '| cold `pen exec --profile small NAME -- true` (median) | %s s |\n' "$(echo "$small_runs" | median)"
if [ -n "$steps" ]; then
    printf '\nbuild steps (build.log):\n%s\n' "$steps"
fi
