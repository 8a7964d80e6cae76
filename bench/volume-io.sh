#!/usr/bin/env bash
# Volume I/O benchmark (see bench/README.md, "Volumes"), in one run:
#   1. sequential read (dd, 1 MiB blocks) of one 1 GiB file in the guest from a volume
#      (squashfs on a read-only virtio disk), from /workspace (virtio-fs) and from the overlay
#      disk (ext4), the guest's caches dropped before each read (the host's page cache is
#      warm for all three: the files were just written); rounds rotate the order;
#   2. host memory with 4 VMs each reading the same 1 GiB file from one volume: the volume
#      file's pages in the host's page cache (fincore; its cache is dropped first with
#      `dd iflag=nocache`, no root needed) and each VM's QEMU (RSS, PSS).
# The file is random data, so squashfs cannot compress it: the volume is 1 GiB too.
#
# Usage: bench/volume-io.sh [--pen PATH] [--images DIR] [--rounds N]
#   --pen     the pen binary (default: target/release/pen)
#   --images  an images directory to share (default: $PEN_HOME/images or
#             ~/.config/pen/images when a base image is there)
#   --rounds  rounds of part 1 (default 3)
# Everything lives in one directory under $TMPDIR (a private PEN_HOME, the workspace, the
# source tree), removed at the end. VMs: --cpus 1 --memory 1024 --disk-size 4G.
set -euo pipefail

usage() { echo "usage: bench/volume-io.sh [--pen PATH] [--images DIR] [--rounds N]" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
pen="$repo/target/release/pen"
images=""
rounds=3
while [ $# -gt 0 ]; do
    case "$1" in
        --pen) pen=$2; shift 2 ;;
        --images) images=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || usage
[ -x "$pen" ] || { echo "volume-io.sh: $pen not found; build it (cargo build --release -p pen) or pass --pen" >&2; exit 2; }
if [ -z "$images" ]; then
    for d in "${PEN_HOME:-}/images" "$HOME/.config/pen/images"; do
        if [ -f "$d/base.json" ]; then images=$d; break; fi
    done
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/pen-volio.XXXXXX")
export PEN_HOME="$root/home"
vms=(vio m1 m2 m3 m4)
cleanup() {
    for vm in "${vms[@]}"; do "$pen" stop --force "$vm" >/dev/null 2>&1 || true; done
    rm -rf "$root"
}
trap cleanup EXIT
mkdir -p "$PEN_HOME" "$root/ws" "$root/src"
[ -n "$images" ] && ln -s "$(cd "$images" && pwd)" "$PEN_HOME/images"
flags=(--cpus 1 --memory 1024 --disk-size 4G --dir "$root/ws")

echo "volume-io: writing a 1 GiB random file" >&2
head -c 1G /dev/urandom > "$root/src/big"
cp "$root/src/big" "$root/ws/big"
start=$(date +%s.%N)
"$pen" volume create big --from "$root/src" >&2
echo "volume-io: pen volume create (1 GiB, zstd): $(echo "$(date +%s.%N) - $start" | bc) s" >&2

# First boot (overlay format) and the overlay copy: not measured.
"$pen" exec vio "${flags[@]}" --volume big:/opt/big -- sh -c 'cp /opt/big/big /root/big && sync' >&2

read_script='
for src in "$@"; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    s=$(date +%s.%N); dd if="$src" of=/dev/null bs=1M 2>/dev/null; e=$(date +%s.%N)
    echo "$src $s $e"
done'
declare -A secs
for r in $(seq 1 "$rounds"); do
    case $((r % 3)) in
        1) order=(/opt/big/big /workspace/big /root/big) ;;
        2) order=(/workspace/big /root/big /opt/big/big) ;;
        0) order=(/root/big /opt/big/big /workspace/big) ;;
    esac
    while read -r src s e; do
        secs[$src]+="$(echo "$e - $s" | bc) "
    done < <("$pen" exec vio -- sh -c "$read_script" sh "${order[@]}")
done
"$pen" list >/dev/null
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| source (1 GiB, sequential, dd bs=1M) | median s | MiB/s | all rounds (s) |"
echo "|---|---|---|---|"
for src in /opt/big/big /workspace/big /root/big; do
    case $src in
        /opt/big/big) what="volume (squashfs, read-only virtio-blk)" ;;
        /workspace/big) what="/workspace (virtio-fs)" ;;
        /root/big) what="overlay disk (ext4 on virtio-blk)" ;;
    esac
    m=$(echo "${secs[$src]}" | median)
    echo "| $what | $m | $(echo "1024 / $m" | bc) | ${secs[$src]}|"
done

# Part 2: 4 VMs reading one volume.
for vm in m1 m2 m3 m4; do
    "$pen" start "$vm" "${flags[@]}" --volume big:/opt/big >/dev/null 2>&1
done
vol="$PEN_HOME/volumes/big.sqfs"
dd if="$vol" iflag=nocache count=0 status=none
cached() { fincore --bytes --noheadings --output RES "$vol" | tr -d ' '; }
before=$(cached)
pids=()
for vm in m1 m2 m3 m4; do
    "$pen" exec "$vm" -- dd if=/opt/big/big of=/dev/null bs=1M 2>/dev/null &
    pids+=($!)
done
start=$(date +%s.%N)
wait "${pids[@]}"
took=$(echo "$(date +%s.%N) - $start" | bc)
after=$(cached)
echo
echo "4 VMs read the same 1 GiB volume file at once in $took s"
echo "| measure | value |"
echo "|---|---|"
echo "| volume file in the host page cache, before / after | $((before / 1048576)) MiB / $((after / 1048576)) MiB (file: $(( $(stat -c %s "$vol") / 1048576 )) MiB) |"
for vm in m1 m2 m3 m4; do
    sup=$(cat "$PEN_HOME/vms/$vm/lock")
    q=$(pgrep -P "$sup" qemu-system || true)
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$q/status")
    pss=$(awk '/^Pss:/ {print $2}' "/proc/$q/smaps_rollup")
    echo "| QEMU of $vm: RSS / PSS | $((rss / 1024)) MiB / $((pss / 1024)) MiB |"
done
for vm in m1 m2 m3 m4; do "$pen" stop "$vm" >/dev/null 2>&1; done
