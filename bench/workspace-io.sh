#!/usr/bin/env bash
# Workspace I/O benchmark (see bench/README.md, "Workspace I/O: root vs ordinary user"): the
# same file workload on /workspace (virtio-fs) in three setups, in one run:
#   root-C      root, QEMU's C virtiofsd (PEN_VIRTIOFSD=/usr/lib/qemu/virtiofsd; what pen
#               used before it preferred the Rust one);
#   root-Rust   root, the Rust virtiofsd pen finds by itself (/root/.local/bin/virtiofsd);
#   user-Rust   an ordinary user (USER), the Rust virtiofsd from ~USER/.local/bin.
# The workload, in the guest (`pen exec NAME -- bash /workspace/bench.sh`): untar a generated
# tree of 10 000 small files in 100 directories into /workspace/t and sync; `find | wc -l`;
# `ls -lR`; cat every file; drop the guest's caches (echo 3 > /proc/sys/vm/drop_caches), then
# find and cat again; `rm -rf` and sync. (git is not in the base image: find and ls -lR stand
# in for `git status`, which walks and stats the tree the same way.)
#
# Usage (as root): bench/workspace-io.sh [--rounds N] [--pen PATH] USER
#   --rounds  rounds (default 3); each round runs the three setups once, the order reversed
#             every other round so that a change in the host's load hits all alike
#   --pen     the pen binary (default: target/release/pen, built if missing); copied to a
#             private directory with mode 755 so that USER can run it
#
# Everything lives under one directory in $TMPDIR, removed at the end: root's PEN_HOME (both
# root setups, one VM each), USER's PEN_HOME and workspace (owned by USER), root's two
# workspaces. The base image is built once per PEN_HOME (minutes under TCG), timed and
# reported apart; so is each VM's first boot. VMs: --cpus 1 --memory 1024 --disk-size 2G.
set -euo pipefail

usage() { echo "usage: bench/workspace-io.sh [--rounds N] [--pen PATH] USER (as root)" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
pen_src="$repo/target/release/pen"
rounds=3
user=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --pen) pen_src=$2; shift 2 ;;
        -*) usage ;;
        *) [ -z "$user" ] || usage; user=$1; shift ;;
    esac
done
[ -n "$user" ] || usage
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || usage
if [ "$(id -u)" != 0 ]; then
    echo "workspace-io.sh: run it as root (it runs pen as root and as $user)" >&2
    exit 2
fi
uid=$(id -u "$user") || { echo "workspace-io.sh: no user $user" >&2; exit 2; }
[ "$uid" != 0 ] || { echo "workspace-io.sh: $user is root; name an ordinary user" >&2; exit 2; }
user_home=$(getent passwd "$user" | cut -d: -f6)
c_vfsd=/usr/lib/qemu/virtiofsd
for f in "$c_vfsd" /root/.local/bin/virtiofsd "$user_home/.local/bin/virtiofsd"; do
    [ -x "$f" ] || echo "workspace-io.sh: warning: $f is missing; pen may pick another virtiofsd" >&2
done
if [ ! -x "$pen_src" ]; then
    echo "workspace-io.sh: building $pen_src" >&2
    (cd "$repo" && cargo build --release -p pen >&2)
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/pen-bench-wsio.XXXXXX")
chmod 711 "$root"
mkdir -m 755 "$root/bin"
install -m 755 "$pen_src" "$root/bin/pen"
pen="$root/bin/pen"
mkdir -p "$root/root-home" "$root/ws-c" "$root/ws-rust"
install -d -m 700 -o "$user" -g "$(id -g "$user")" "$root/user" "$root/user/home" "$root/user/ws"
log="$root/log"
: >"$log"

sides=(root-C root-Rust user-Rust)
declare -A vm=([root-C]=wsio-c [root-Rust]=wsio-rust [user-Rust]=wsio-user)
declare -A ws=([root-C]="$root/ws-c" [root-Rust]="$root/ws-rust" [user-Rust]="$root/user/ws")
declare -A vfsd_want=([root-C]="$c_vfsd" [root-Rust]=/root/.local/bin/virtiofsd
    [user-Rust]="$user_home/.local/bin/virtiofsd")
sys_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# `pen ARGS...` as a side runs it: a clean environment, its own PEN_HOME; no
# XDG_RUNTIME_DIR, so pen derives its runtime directory from PEN_HOME.
pen_as() {
    local side=$1; shift
    case "$side" in
        root-C) env -i HOME=/root PATH="$sys_path:/root/.local/bin" PEN_HOME="$root/root-home" \
            PEN_VIRTIOFSD="$c_vfsd" "$pen" "$@" ;;
        root-Rust) env -i HOME=/root PATH="$sys_path:/root/.local/bin" PEN_HOME="$root/root-home" \
            "$pen" "$@" ;;
        user-Rust) (cd "$root/user" && runuser -u "$user" -- env -i HOME="$user_home" \
            PATH="$sys_path:$user_home/.local/bin" PEN_HOME="$root/user/home" "$pen" "$@") ;;
    esac
}

cleanup() {
    local s
    for s in "${sides[@]}"; do
        pen_as "$s" stop --force "${vm[$s]}" >/dev/null 2>&1 || true
    done
    rm -rf "$root"
}
trap cleanup EXIT

now() { date +%s.%N; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
fail() {
    echo "workspace-io.sh: $*; the log's end:" >&2
    tail -n 30 "$log" >&2
    exit 1
}
# Seconds taken by `pen ARGS...` as SIDE; pen's stdout goes to $out, stderr to the log.
out=/dev/null
timed() {
    local side=$1 start end; shift
    start=$(now)
    pen_as "$side" "$@" >"$out" 2>>"$log" || fail "pen $* ($side) failed"
    end=$(now)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }'
}
# A finished exec's VM powers off by itself; the next cold start waits for that.
wait_stopped() {
    local _
    for _ in $(seq 600); do
        if [ "$(pen_as "$1" list | awk -v n="${vm[$1]}" '$1 == n { print $3 }')" = stopped ]; then
            return
        fi
        sleep 0.5
    done
    fail "VM ${vm[$1]} ($1) did not stop"
}

# The tree: 100 directories of 100 files, 200-2000 bytes of text each (~11 MB), the same
# every run; packed once, copied into each workspace.
python3 - "$root/tree.tar" <<'EOF'
import io, random, sys, tarfile
rng = random.Random(1)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
         for _ in range(500)]
with tarfile.open(sys.argv[1], "w", format=tarfile.GNU_FORMAT) as tar:
    for d in range(100):
        info = tarfile.TarInfo(f"tree/d{d:03}")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
        tar.addfile(info)
        for f in range(100):
            size = rng.randint(200, 2000)
            text = b""
            while len(text) < size:
                text += rng.choice(words) + (b"\n" if rng.random() < 0.1 else b" ")
            info = tarfile.TarInfo(f"tree/d{d:03}/f{f:03}.txt")
            info.size, info.mode, info.mtime = size, 0o644, 1700000000
            tar.addfile(info, io.BytesIO(text[:size]))
EOF

# The guest's script: one line of step times (seconds), parsed below.
cat >"$root/bench.sh" <<'EOF'
set -eu
cd /workspace
rm -rf t; mkdir t; sync
ts() { date +%s.%N; }
t0=$(ts); tar xf /workspace/tree.tar -C /workspace/t; sync; t1=$(ts)
n=$(find /workspace/t | wc -l); t2=$(ts)
ls -lR /workspace/t > /dev/null; t3=$(ts)
bytes=$(find /workspace/t -type f -exec cat {} + | wc -c); t4=$(ts)
echo 3 > /proc/sys/vm/drop_caches; t5=$(ts)
find /workspace/t | wc -l > /dev/null; t6=$(ts)
find /workspace/t -type f -exec cat {} + > /dev/null; t7=$(ts)
rm -rf /workspace/t; sync; t8=$(ts)
awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v e="$t4" -v f="$t5" -v g="$t6" -v h="$t7" \
    -v i="$t8" -v n="$n" -v by="$bytes" 'BEGIN {
    printf "WSIO entries=%d bytes=%d untar=%.2f find=%.2f ls=%.2f cat=%.2f find_cold=%.2f cat_cold=%.2f rm=%.2f\n",
        n, by, b - a, c - b, d - c, e - d, g - f, h - g, i - h }'
EOF
for s in "${sides[@]}"; do
    cp "$root/tree.tar" "$root/bench.sh" "${ws[$s]}/"
done
chown -R "$user:$(id -g "$user")" "$root/user/ws"

echo "workspace-io.sh: $(pen_as root-C version), $(nproc) CPUs, load $(load), in $root" >&2
flags=(--cpus 1 --memory 1024 --disk-size 2G)
declare -A build_s first_s
# The base image, once per PEN_HOME: root's (both root setups) and the user's.
for s in root-C user-Rust; do
    who=root; [ "$s" = root-C ] || who=$user
    echo "workspace-io.sh: building the base image as $who (minutes)" >&2
    build_s[$s]=$(timed "$s" image build --base)
done
for s in "${sides[@]}"; do
    echo "workspace-io.sh: first boot of ${vm[$s]} ($s)" >&2
    first_s[$s]=$(timed "$s" exec "${vm[$s]}" --dir "${ws[$s]}" "${flags[@]}" -- true)
    wait_stopped "$s"
    sup="${vm[$s]}/supervisor.log"
    case "$s" in user-Rust) sup="$root/user/home/vms/$sup" ;; *) sup="$root/root-home/vms/$sup" ;; esac
    started=$(grep -m1 'supervisor: starting virtiofsd:' "$sup" | sed 's/.*starting virtiofsd: //')
    echo "workspace-io.sh: $s: virtiofsd ${started:0:200}" >&2
    [ "${started%% *}" = "${vfsd_want[$s]}" ] ||
        fail "$s started ${started%% *}, not ${vfsd_want[$s]}"
done

results="$root/results"
: >"$results"
for i in $(seq "$rounds"); do
    order=("${sides[@]}")
    if [ $((i % 2)) = 0 ]; then order=(user-Rust root-Rust root-C); fi
    for s in "${order[@]}"; do
        l0=$(load)
        echo "workspace-io.sh: round $i of $rounds: $s (load $l0)" >&2
        out="$root/out"
        wall=$(timed "$s" exec "${vm[$s]}" -- bash /workspace/bench.sh)
        out=/dev/null
        line=$(grep '^WSIO ' "$root/out") || fail "no figures from $s: $(cat "$root/out")"
        echo "workspace-io.sh:   $s: ${line#WSIO } exec=$wall" >&2
        echo "$s $i ${line#WSIO } exec=$wall load=${l0%% *}" >>"$results"
        wait_stopped "$s"
    done
done

steps=(untar find ls cat find_cold cat_cold rm exec)
# shellcheck disable=SC2016 # backquotes: Markdown, not expansions
declare -A label=([untar]="untar 10 000 files + sync" [find]='`find` (count)' [ls]='`ls -lR`'
    [cat]="cat every file" [find_cold]='`find` after drop_caches' [cat_cold]="cat after drop_caches"
    [rm]='`rm -rf` + sync' [exec]="whole \`pen exec\` (boot, all steps, power-off)")
# median SIDE STEP: over the rounds.
median() {
    awk -v s="$1" -v k="$2" '$1 == s { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) print kv[2] } }' \
        "$results" | sort -n |
        awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

accel=$(grep -o 'accel [a-z]*' "$root/root-home/vms/${vm[root-C]}/supervisor.log" 2>/dev/null | head -n1 | cut -d' ' -f2 || true)
[ -n "$accel" ] || accel=$(grep -q 'using TCG' "$log" && echo tcg || echo kvm)
printf '\n%s, %s CPUs, %s, %s round(s), VMs --cpus 1 --memory 1024; load average (1 min) at the start of each run: %s\n\n' \
    "$(date -u +%Y-%m-%d)" "$(nproc)" "$accel" "$rounds" \
    "$(awk '{ for (i = 3; i <= NF; i++) if ($i ~ /^load=/) { sub("load=", "", $i); printf "%s%s", sep, $i; sep = ", " } }' "$results")"
printf '| step (seconds, median) | root + C | root + Rust | user + Rust | user+Rust / root+C | root+Rust / root+C |\n'
printf '|---|---|---|---|---|---|\n'
for k in "${steps[@]}"; do
    c=$(median root-C "$k"); r=$(median root-Rust "$k"); u=$(median user-Rust "$k")
    printf '| %s | %s | %s | %s | %s | %s |\n' "${label[$k]}" "$c" "$r" "$u" "$(ratio "$u" "$c")" "$(ratio "$r" "$c")"
done
printf '\nnot in the figures: base image build, root %s s, %s %s s; first boot (overlay format): root-C %s s, root-Rust %s s, user-Rust %s s\n' \
    "${build_s[root-C]}" "$user" "${build_s[user-Rust]}" "${first_s[root-C]}" "${first_s[root-Rust]}" "${first_s[user-Rust]}"
printf '\nper run (side, round, step times):\n'
cat "$results"
