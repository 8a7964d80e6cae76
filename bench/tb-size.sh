#!/usr/bin/env bash
# TCG translation buffer benchmark (see bench/README.md, "TCG translation buffer"): QEMU's
# `-accel tcg,tb-size=N` against speed and QEMU's own memory, sizes alternated round by round
# so that a change in the host's load hits all alike. Per size and round:
#   1. `pen start --no-snapshot` of a stopped VM (cold boot) and its wall time;
#   2. a workload by `pen exec` that runs much distinct guest code (tar + gzip over perl's
#      modules, perl, apt-cache, dpkg, find), its wall time;
#   3. QEMU's RssAnon after it (anonymous memory: the translation buffer and QEMU's heap;
#      guest RAM is a shared memfd and not in it), then `pen stop`.
# A QEMU wrapper (PEN_QEMU) rewrites pen's `-accel tcg,...` argument to the size under test
# (`default` = no tb-size: QEMU's own, 1 GiB), whatever pen itself sets.
#
# Usage: bench/tb-size.sh [--pen PATH] [--images DIR] [--rounds N] [SIZE_MIB|default ...]
#   default sizes: default 256 64
# Under TCG only (PEN_ACCEL=tcg is set). VMs: --cpus 2 --memory 1024 --disk-size 4G.
set -euo pipefail

usage() { echo "usage: bench/tb-size.sh [--pen PATH] [--images DIR] [--rounds N] [SIZE ...]" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
pen="$repo/target/release/pen"
images=""
rounds=3
sizes=()
while [ $# -gt 0 ]; do
    case "$1" in
        --pen) pen=$2; shift 2 ;;
        --images) images=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        default|[1-9]*) sizes+=("$1"); shift ;;
        *) usage ;;
    esac
done
[ ${#sizes[@]} -gt 0 ] || sizes=(default 256 64)
[ -x "$pen" ] || { echo "tb-size.sh: $pen not found; build it or pass --pen" >&2; exit 2; }
if [ -z "$images" ]; then
    for d in "${PEN_HOME:-}/images" "$HOME/.config/pen/images"; do
        if [ -f "$d/base.json" ]; then images=$d; break; fi
    done
fi
[ -n "$images" ] || { echo "tb-size.sh: no base image; pass --images" >&2; exit 2; }
images=$(cd "$images" && pwd)
qemu=${PEN_QEMU:-$(command -v qemu-system-x86_64)}

work=$(mktemp -d "${TMPDIR:-/tmp}/pen-tb-size.XXXXXX")
export PEN_HOME=$work/home PEN_ACCEL=tcg
mkdir -p "$PEN_HOME" "$work/ws"
ln -s "$images" "$PEN_HOME/images"
cleanup() {
    "$pen" stop tb >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

for size in "${sizes[@]}"; do
    accel="tcg,thread=multi"
    [ "$size" = default ] || accel="$accel,tb-size=$size"
    cat >"$work/qemu-$size" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    case \$a in tcg,*) a="$accel" ;; esac
    args+=("\$a")
done
exec "$qemu" "\${args[@]}"
EOF
    chmod +x "$work/qemu-$size"
done

workload='
tar -cf - /usr/share/perl* /usr/lib/x86_64-linux-gnu/perl* 2>/dev/null | gzip -1 | sha256sum >/dev/null
perl -e "my %h; for (1..100000) { \$h{\$_ % 997} .= chr(65 + \$_ % 26) } print scalar(keys %h)" >/dev/null
apt-cache dumpavail >/dev/null 2>&1; apt-cache stats >/dev/null 2>&1
dpkg -l >/dev/null; dpkg -S /bin/ls >/dev/null
find / -xdev -type f 2>/dev/null | wc -l >/dev/null'


ms() { date +%s%3N; }
qemu_anon_mib() {
    local pid
    pid=$(pgrep -f -- "-name tb( |$)" | head -1)
    awk '/^RssAnon:/ {printf "%d", $2/1024}' "/proc/$pid/status"
}

printf '%-8s %5s %9s %11s %14s\n' size round "boot ms" "workload ms" "QEMU anon MiB"
for round in $(seq "$rounds"); do
    for size in "${sizes[@]}"; do
        export PEN_QEMU="$work/qemu-$size"
        t0=$(ms)
        "$pen" start tb --dir "$work/ws" --no-snapshot --cpus 2 --memory 1024 --disk-size 4G >/dev/null 2>"$work/start.err" || { cat "$work/start.err" >&2; exit 1; }
        t1=$(ms)
        "$pen" exec tb -- sh -c "$workload"
        t2=$(ms)
        anon=$(qemu_anon_mib)
        "$pen" stop tb >/dev/null 2>&1
        printf '%-8s %5s %9s %11s %14s\n' "$size" "$round" $((t1 - t0)) $((t2 - t1)) "$anon"
    done
done
