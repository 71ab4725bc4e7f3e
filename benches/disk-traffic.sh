#!/usr/bin/env bash
# disk-traffic.sh - what each NBD server makes the disk and the CPUs do per client write.
#
# For each target it copies one image, starts the server on it, runs fio (nbd engine,
# 4 KiB random writes, queue depth 32 by default) and samples, over a window in the
# middle of the run, the bytes the kernel wrote to the disk holding the image
# (/proc/diskstats), the busy and idle CPU time of the whole machine (/proc/stat) and
# the CPU time of the server's own processes (/proc/PID/stat: the server and its
# children, all their threads). It prints IOPS, client MiB/s, disk MiB/s, disk bytes per
# client byte, busy CPU microseconds per I/O of the whole machine (fio included), the
# server's own CPU microseconds per I/O, and the idle share. On a machine that others
# load too, only the server's column stays meaningful (the machine's counts their work).
# IOPS is fio's over its whole run; the window's disk bytes and CPU time are divided by
# it (steady load, so close). Targets:
#   nbdkit      nbdkit's file plugin (writes land in the page cache; flush = fdatasync)
#   qemu-nbd    qemu-nbd --cache=none --aio=io_uring (O_DIRECT, every write reaches the disk)
#   standalone  replctl serve on the image (one replicad node, journal and checksums on)
#   pair        replctl serve with --peer-disk (a sync pair on this machine)
# usage: disk-traffic.sh --replctl PATH [--targets LIST] [--size 1G] [--runtime 12]
#                        [--window 5] [--bs 4k] [--qd 32] [--dir DIR]
# Needs root (drops the page cache), fio, nbdkit, qemu-nbd, nbdinfo. Binds 127.0.0.1 only.
set -euo pipefail

REPLCTL= TARGETS=nbdkit,qemu-nbd,standalone,pair SIZE=1G RUNTIME=12 WINDOW=5 BS=4k QD=32
PARENT=/var/tmp
while (($#)); do
  case $1 in
    --replctl) REPLCTL=$2; shift ;;  --targets) TARGETS=$2; shift ;;
    --size) SIZE=$2; shift ;;        --runtime) RUNTIME=$2; shift ;;
    --window) WINDOW=$2; shift ;;    --bs) BS=$2; shift ;;
    --qd) QD=$2; shift ;;            --dir) PARENT=$2; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -x $REPLCTL || $TARGETS != *standalone* && $TARGETS != *pair* ]] ||
  { echo "--replctl PATH is needed for standalone and pair" >&2; exit 2; }
((WINDOW + 4 <= RUNTIME)) || { echo "--runtime must exceed --window by 4 s" >&2; exit 2; }

WORK=$(mktemp -d "$PARENT/disk-traffic.XXXXXX")
SERVER=
cleanup() {
  [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# The disk (as named in /proc/diskstats) under the work directory.
source_dev=$(findmnt -no SOURCE --target "$WORK")
DISK=$(basename "$(readlink -f "$source_dev")")
grep -qw "$DISK" /proc/diskstats || { echo "no diskstats for $DISK" >&2; exit 1; }
sectors_written() { awk -v d="$DISK" '$3 == d { print $10 }' /proc/diskstats; }
cpu_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }
# utime + stime of the server and its children (replctl serve runs the daemons as
# children), every thread included; the fields after "(comm) " so a comm with spaces
# cannot shift them.
server_ticks() {
  local pid total=0
  for pid in "$SERVER" $(pgrep -P "$SERVER"); do
    total=$((total + $(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null |
      awk '{ print $12 + $13 }' || echo 0)))
  done
  echo "$total"
}

fio --name=fill --filename="$WORK/image" --size="$SIZE" --rw=write --bs=1M \
  --refill_buffers --direct=1 --output=/dev/null
HZ=$(getconf CLK_TCK)
printf '%-11s %8s %11s %10s %11s %12s %12s %6s\n' target IOPS client_MiB/s disk_MiB/s \
  disk/client cpu_us/io server_us/io idle
for target in ${TARGETS//,/ }; do
  dir="$WORK/$target"
  mkdir -p "$dir"
  cp "$WORK/image" "$dir/a.img"
  port=$((20000 + RANDOM % 20000))
  case $target in
    nbdkit) nbdkit -f -p "$port" -i 127.0.0.1 file "$dir/a.img" >"$dir/log" 2>&1 & ;;
    qemu-nbd) qemu-nbd -t -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p "$port" \
      "$dir/a.img" >"$dir/log" 2>&1 & ;;
    standalone) "$REPLCTL" serve --disk "$dir/a.img" --nbd "127.0.0.1:$port" \
      --dir "$dir/ours" >"$dir/log" 2>&1 & ;;
    pair) cp "$dir/a.img" "$dir/b.img"
      "$REPLCTL" serve --disk "$dir/a.img" --peer-disk "$dir/b.img" \
        --nbd "127.0.0.1:$port" --dir "$dir/ours" >"$dir/log" 2>&1 & ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  SERVER=$!
  up=0
  for _ in $(seq 600); do
    if nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1; then up=1; break; fi
    kill -0 "$SERVER" 2>/dev/null || break
    sleep 0.1
  done
  ((up)) || { echo "$target did not start:" >&2; tail -n 5 "$dir/log" >&2; exit 1; }
  sync
  echo 3 >/proc/sys/vm/drop_caches
  fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$port" --rw=randwrite --bs="$BS" \
    --iodepth="$QD" --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 \
    --output-format=json --output="$dir/fio.json" &
  fio_pid=$!
  sleep 3
  s1=$(sectors_written); read -r busy1 idle1 < <(cpu_ticks); own1=$(server_ticks)
  sleep "$WINDOW"
  s2=$(sectors_written); read -r busy2 idle2 < <(cpu_ticks); own2=$(server_ticks)
  wait "$fio_pid"
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
  iops=$(python3 -c "
import json; print(round(json.load(open('$dir/fio.json'))['jobs'][0]['write']['iops']))")
  bs_bytes=$(numfmt --from=iec "${BS^^}")
  awk -v t="$target" -v iops="$iops" -v bs="$bs_bytes" -v s=$((s2 - s1)) -v w="$WINDOW" \
    -v b=$((busy2 - busy1)) -v i=$((idle2 - idle1)) -v o=$((own2 - own1)) -v hz="$HZ" 'BEGIN {
      client = iops * bs / 1048576; disk = s * 512 / 1048576 / w
      printf "%-11s %8d %11.0f %10.0f %11.2f %12.1f %12.1f %5.0f%%\n", t, iops, client, disk,
        disk / client, b / hz * 1e6 / (iops * w), o / hz * 1e6 / (iops * w),
        100 * i / (b + i) }'
done
