#!/usr/bin/env bash
# peers.sh - replicad next to its peers: one fio client, the same image files, one run.
#
# The script makes its own image files, then for each target starts the server on them,
# runs one fio client per workload against it, stops the server and goes on to the next
# target. With --repeat N it goes round the targets N times and reports the median of
# every figure; the ratios of replicad against its peers are taken within the run.
# Usage: benches/peers.sh --help. Method and published figures: docs/BENCHMARKS.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benches/peers.sh [options]

One fio client (numjobs=1) against each target in turn, on the same image files, with
the image's page cache dropped before every workload; prints one table of figures and
one of ratios (ours and ours-pair against nbdkit, qemu-nbd, mirror and raw).

targets (--targets LIST, comma-separated; default: all, in this order)
  raw         fio io_uring O_DIRECT on image A itself, no server: the disk's limit
  nbdkit      nbdkit's file plugin on A; writes stay in the host page cache until a
              FLUSH: the ceiling of NBD over loopback, not a like-for-like durable peer
  qemu-nbd    qemu-nbd --cache=none --aio=io_uring (native without io_uring) on A
  mirror      qemu-storage-daemon exporting A with a blockdev-mirror job (sync=full,
              copy-mode=write-blocking) to image B served by qemu-nbd --cache=none:
              QEMU's synchronous replication, the like-for-like peer of ours-pair
  ours        replctl serve --disk A: one replicad node
  ours-pair   replctl serve --disk A --peer-disk B: a sync pair on loopback

workloads (--workloads LIST; default: all)
  rw4k_qd32     4 KiB random writes, 32 in flight
  rw4k_qd1      4 KiB random writes, one at a time (p50 and p99 latency)
  seq1m         1 MiB sequential writes, 8 in flight
  rr4k_qd32     4 KiB random reads, 32 in flight
  rw4k_flush32  4 KiB random writes, one at a time, a FLUSH after every 32 writes
                (--flush-qd N for more in flight: fio then sends a FLUSH every few
                writes, not every 32; the report shows writes per FLUSH)

options
  --size SIZE          size of the image files, e.g. 256M, 1G (default 1G)
  --runtime SECONDS    measured time of each workload (default 10)
  --ramp SECONDS       unmeasured warm-up before it (default 2)
  --repeat N           go round all targets N times; figures are medians (default 1)
  --flush-qd N         iodepth of rw4k_flush32 (default 1)
  --replctl PATH       replctl for ours and ours-pair (default: target/release/replctl
                       of this checkout; cargo build --release -p replicad-tools)
  --dir DIR            parent of the work directory, not on tmpfs (default /var/tmp)
  --start-timeout SEC  longest wait for a server to serve (default 120)
  --keep               keep the work directory (images, fio JSON, server logs)
  --json               print the result as one JSON document on stdout
  -h, --help           this text

Binds 127.0.0.1 only. Every process it starts and every file it makes is removed on
exit, on error and on Ctrl-C (unless --keep). Needs fio, nbdinfo (libnbd-bin), python3,
setpriv (util-linux), and for the servers nbdkit or qemu-utils.
EOF
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HELPER="$HERE/peers_report.py"
ALL_TARGETS=raw,nbdkit,qemu-nbd,mirror,ours,ours-pair
ALL_WORKLOADS=rw4k_qd32,rw4k_qd1,seq1m,rr4k_qd32,rw4k_flush32

COMMAND_LINE=benches/peers.sh
for arg in "$@"; do  # as typed, quoted only where a shell needs it
  if [[ $arg =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then
    COMMAND_LINE+=" $arg"
  else
    COMMAND_LINE+=" $(printf %q "$arg")"
  fi
done
SIZE=1G RUNTIME=10 RAMP=2 REPEAT=1 FLUSH_QD=1 START_TIMEOUT=120 KEEP=0 JSON=0 PARENT=/var/tmp
TARGETS=$ALL_TARGETS WORKLOADS=$ALL_WORKLOADS REPLCTL="$REPO/target/release/replctl"

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'peers.sh: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'peers.sh: %s (see --help)\n' "$*" >&2; exit 2; }

while (($#)); do
  case $1 in
    --size | --runtime | --ramp | --repeat | --flush-qd | --targets | --workloads | --replctl | \
      --dir | --start-timeout)
      (($# >= 2)) || usage_error "$1 needs a value"
      case $1 in
        --size) SIZE=$2 ;;          --runtime) RUNTIME=$2 ;;      --ramp) RAMP=$2 ;;
        --repeat) REPEAT=$2 ;;      --targets) TARGETS=$2 ;;      --workloads) WORKLOADS=$2 ;;
        --replctl) REPLCTL=$2 ;;    --dir) PARENT=$2 ;;           --start-timeout) START_TIMEOUT=$2 ;;
        --flush-qd) FLUSH_QD=$2 ;;
      esac
      shift ;;
    --keep) KEEP=1 ;;
    --json) JSON=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown option $1" ;;
  esac
  shift
done

# ---------------------------------------------------------------------------- checks

for pair in "runtime:$RUNTIME" "ramp:$RAMP" "repeat:$REPEAT" "flush-qd:$FLUSH_QD" \
  "start-timeout:$START_TIMEOUT"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || usage_error "--${pair%%:*} must be a whole number"
done
((RUNTIME >= 1 && REPEAT >= 1 && FLUSH_QD >= 1 && START_TIMEOUT >= 1)) ||
  usage_error "--runtime, --repeat, --flush-qd and --start-timeout must be at least 1"
size=${SIZE^^}     # 1G, 1g, 1GiB and 1GB all mean 2^30 bytes, as for fio
size=${size%B}
BYTES=$(numfmt --from=iec "${size%I}" 2>/dev/null) || usage_error "--size $SIZE is not a size (e.g. 256M, 1G)"
((BYTES >= 32 << 20 && BYTES % (1 << 20) == 0)) ||
  usage_error "--size must be a whole number of MiB, at least 32M"

IFS=, read -ra TARGET_LIST <<<"$TARGETS"
IFS=, read -ra WORKLOAD_LIST <<<"$WORKLOADS"
((${#TARGET_LIST[@]} > 0 && ${#WORKLOAD_LIST[@]} > 0)) || usage_error "no target or no workload"
for target in "${TARGET_LIST[@]}"; do
  [[ ,$ALL_TARGETS, == *",$target,"* ]] || usage_error "unknown target '$target' (known: $ALL_TARGETS)"
done
for workload in "${WORKLOAD_LIST[@]}"; do
  [[ ,$ALL_WORKLOADS, == *",$workload,"* ]] ||
    usage_error "unknown workload '$workload' (known: $ALL_WORKLOADS)"
done
[[ $(printf '%s\n' "${TARGET_LIST[@]}" | sort | uniq -d) == "" &&
  $(printf '%s\n' "${WORKLOAD_LIST[@]}" | sort | uniq -d) == "" ]] ||
  usage_error "a target or workload is named twice"
wants() { [[ ,$TARGETS, == *",$1,"* ]]; }

need() {  # TOOL PACKAGE
  command -v "$1" >/dev/null 2>&1 || die "$1 is missing: install the Debian package $2"
}
need fio fio
need python3 python3
need setpriv util-linux
need timeout coreutils
need numfmt coreutils
[[ -f $HELPER ]] || die "$HELPER is missing (it belongs next to this script)"
if [[ $TARGETS != raw ]]; then
  need nbdinfo libnbd-bin
  fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (Debian's fio package has it)"
fi
wants nbdkit && need nbdkit nbdkit
if wants qemu-nbd || wants mirror; then
  need qemu-nbd qemu-utils
  need qemu-io qemu-utils
fi
if wants mirror; then
  need qemu-storage-daemon qemu-utils
  need qemu-img qemu-utils
fi
if wants ours || wants ours-pair; then
  [[ -x $REPLCTL ]] ||
    die "no replctl at $REPLCTL: build it (cargo build --release -p replicad-tools) or pass --replctl PATH"
fi
[[ -d $PARENT ]] || die "--dir $PARENT is not a directory"

# ---------------------------------------------------------------------------- processes

PIDS=()   # every background process of ours that may still run
WORK=

forget() {  # PID: no longer ours to stop
  local pid kept=()
  for pid in "${PIDS[@]}"; do [[ $pid == "$1" ]] || kept+=("$pid"); done
  PIDS=("${kept[@]}")
}

alive() {  # PID: running (a zombie waiting for us does not count)
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [[ $state != Z ]]
}

stop() {  # PID GRACE-SECONDS: SIGTERM, a bounded wait, then SIGKILL
  local pid=$1 tenths=$(($2 * 10))
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid" && ((tenths-- > 0)); do sleep 0.1; done
  if alive "$pid"; then
    log "process $pid ignored SIGTERM for $2 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

cleanup() {
  local status=$? i
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}" 30; done
  if [[ -n $WORK && -d $WORK ]]; then
    if ((KEEP)); then log "kept $WORK"; else rm -rf -- "$WORK"; fi
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

spawn() {  # LOG COMMAND...: in the background, dies with this shell; its pid in SPAWNED
  local output=$1
  shift
  setpriv --pdeathsig TERM -- "$@" </dev/null >"$output" 2>&1 &
  SPAWNED=$!
  PIDS+=("$SPAWNED")
}

run() {  # LOG SECONDS COMMAND...: runs it, bounded; a signal to us stops it at once
  local output=$1 limit=$2 status=0
  shift 2
  spawn "$output" timeout --kill-after=10 "$limit" "$@"
  wait "$SPAWNED" || status=$?
  forget "$SPAWNED"
  return "$status"
}

helper() { python3 "$HELPER" "$@"; }

wait_served() {  # NAME PID URI [LOG-LINE]: until the export answers (and the log says so)
  local name=$1 pid=$2 uri=$3 line=${4:-} deadline=$((SECONDS + START_TIMEOUT))
  while true; do
    alive "$pid" || die "$name exited while starting: $(tail -n 5 "$WORK/$name.log")"
    if [[ -z $line ]] || grep -qF -- "$line" "$WORK/$name.log"; then
      timeout 10 nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
    fi
    ((SECONDS < deadline)) ||
      die "$name did not serve $uri within ${START_TIMEOUT}s: $(tail -n 5 "$WORK/$name.log")"
    sleep 0.2
  done
}

# ---------------------------------------------------------------------------- measuring

fio_workload() {  # WORKLOAD: its fio options in FIO_WORKLOAD
  case $1 in
    rw4k_qd32) FIO_WORKLOAD=(--rw=randwrite --bs=4k --iodepth=32) ;;
    rw4k_qd1) FIO_WORKLOAD=(--rw=randwrite --bs=4k --iodepth=1) ;;
    seq1m) FIO_WORKLOAD=(--rw=write --bs=1M --iodepth=8) ;;
    rr4k_qd32) FIO_WORKLOAD=(--rw=randread --bs=4k --iodepth=32) ;;
    # fio's --fsync=32 means a FLUSH after 32 writes only at iodepth 1; with more in
    # flight it sends one every few writes (fio 3.33: about 3 at iodepth 32).
    rw4k_flush32) FIO_WORKLOAD=(--rw=randwrite --bs=4k --iodepth="$FLUSH_QD" --fsync=32) ;;
  esac
}

drop_cache() {  # FILE...: written back, then out of the page cache
  local file
  for file in "$@"; do
    sync "$file"
    dd if="$file" iflag=nocache count=0 status=none
  done
}

measure() {  # TARGET FILE... -- FIO-OPTIONS...: every workload, the files' cache dropped
  local target=$1 workload out
  local -a files=()
  shift
  while [[ $1 != -- ]]; do files+=("$1"); shift; done
  shift
  for workload in "${WORKLOAD_LIST[@]}"; do
    fio_workload "$workload"
    out="$WORK/fio/$ROUND-$target-$workload.json"
    drop_cache "${files[@]}"
    run "${out%.json}.log" $((RAMP + RUNTIME + 60)) fio --name="$target-$workload" "$@" \
      "${FIO_WORKLOAD[@]}" --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
      --norandommap --randrepeat=0 --lat_percentiles=1 --output-format=json --output="$out" ||
      die "fio failed on $target/$workload: $(tail -n 5 "${out%.json}.log")"
    helper record "$RESULTS" "$ROUND" "$target" "$workload" "$out" ||
      die "no figures from fio for $target/$workload"
  done
}

fill() {  # FILE: fully allocated, random data (holes would make reads free)
  run "$WORK/fill.log" 600 fio --name=fill --filename="$1" --size="$BYTES" --rw=write --bs=1M \
    --ioengine=psync --direct=1 --refill_buffers ||
    die "cannot fill $1: $(tail -n 5 "$WORK/fill.log")"
}

# ---------------------------------------------------------------------------- targets

target_raw() {
  measure raw "$A" -- --ioengine=io_uring --direct=1 --filename="$A"
}

target_nbdkit() {
  local port pid
  port=$(helper free-port)
  spawn "$WORK/nbdkit.log" nbdkit --foreground --ipaddr 127.0.0.1 --port "$port" file "$A"
  pid=$SPAWNED
  wait_served nbdkit "$pid" "nbd://127.0.0.1:$port"
  measure nbdkit "$A" -- --ioengine=nbd --uri="nbd://127.0.0.1:$port"
  stop "$pid" 30
}

target_qemu_nbd() {
  local port pid
  port=$(helper free-port)
  spawn "$WORK/qemu-nbd.log" qemu-nbd --persistent --shared=4 --format=raw --cache=none \
    --aio="$QEMU_AIO" --bind=127.0.0.1 --port="$port" "$A"
  pid=$SPAWNED
  wait_served qemu-nbd "$pid" "nbd://127.0.0.1:$port"
  measure qemu-nbd "$A" -- --ioengine=nbd --uri="nbd://127.0.0.1:$port"
  stop "$pid" 30
}

target_mirror() {
  local port_a port_b replica primary qmp="$WORK/qmp.sock" uri
  port_a=$(helper free-port)
  port_b=$(helper free-port)
  [[ $port_b != "$port_a" ]] || port_b=$(helper free-port)
  # The replica: image B over NBD on loopback TCP, as ours-pair's secondary is reached.
  spawn "$WORK/mirror-replica.log" qemu-nbd --persistent --shared=4 --format=raw \
    --cache=none --aio="$QEMU_AIO" --bind=127.0.0.1 --port="$port_b" --export-name=b "$B"
  replica=$SPAWNED
  wait_served mirror-replica "$replica" "nbd://127.0.0.1:$port_b/b"
  # The primary: qemu-storage-daemon exports A and mirrors every write to B before
  # completing it (copy-mode=write-blocking), once the initial full copy is done.
  rm -f "$qmp"
  spawn "$WORK/mirror.log" qemu-storage-daemon \
    --blockdev "driver=file,node-name=file-a,filename=$A,cache.direct=on,aio=$QEMU_AIO" \
    --blockdev driver=raw,node-name=a,file=file-a \
    --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$port_a" \
    --export type=nbd,id=export-a,node-name=a,name=a,writable=on \
    --chardev "socket,id=qmp,path=$qmp,server=on,wait=off" --monitor chardev=qmp
  primary=$SPAWNED
  uri="nbd://127.0.0.1:$port_a/a"
  wait_served mirror "$primary" "$uri"
  helper qmp "$qmp" blockdev-add "{\"driver\": \"nbd\", \"node-name\": \"replica\",
    \"export\": \"b\", \"server\": {\"type\": \"inet\", \"host\": \"127.0.0.1\",
    \"port\": \"$port_b\"}}" >/dev/null || die "mirror: cannot attach the replica"
  helper qmp "$qmp" blockdev-mirror '{"job-id": "m0", "device": "a", "target": "replica",
    "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": false}' >/dev/null ||
    die "mirror: cannot start the mirror job"
  run "$WORK/mirror-ready.log" "$START_TIMEOUT" python3 "$HELPER" mirror-wait "$qmp" m0 ready \
    "$START_TIMEOUT" || die "mirror: $(tail -n 1 "$WORK/mirror-ready.log")"
  measure mirror "$A" "$B" -- --ioengine=nbd --uri="$uri"
  # Still in step after the run? Then end the job (B stays a full copy) and check it is.
  run "$WORK/mirror-ready.log" 60 python3 "$HELPER" mirror-wait "$qmp" m0 ready 30 ||
    die "mirror: the job fell out of step during the run: $(tail -n 1 "$WORK/mirror-ready.log")"
  helper qmp "$qmp" block-job-cancel '{"device": "m0"}' >/dev/null
  run "$WORK/mirror-ready.log" 60 python3 "$HELPER" mirror-wait "$qmp" m0 concluded 30 ||
    die "mirror: the job did not end: $(tail -n 1 "$WORK/mirror-ready.log")"
  helper qmp "$qmp" quit >/dev/null || true
  stop "$primary" 30
  stop "$replica" 30
  run "$WORK/mirror-compare.log" 600 qemu-img compare -f raw -F raw "$A" "$B" ||
    die "mirror: image B differs from A after the run: $(tail -n 2 "$WORK/mirror-compare.log")"
}

target_ours() {  # NAME [PEER-IMAGE]: one node on A, or a pair with the secondary on PEER-IMAGE
  local name=$1 port pid
  local -a stores=("$A") peer=()
  if (($# > 1)); then stores+=("$2"); peer=(--peer-disk "$2"); fi
  port=$(helper free-port)
  rm -rf -- "$WORK/$name"
  spawn "$WORK/$name.log" "$REPLCTL" serve --disk "$A" "${peer[@]}" --nbd "127.0.0.1:$port" \
    --dir "$WORK/$name"
  pid=$SPAWNED
  # The export answers before the node is promoted: wait for serve's own word.
  wait_served "$name" "$pid" "nbd://127.0.0.1:$port/r0" "serving nbd://"
  measure "$name" "${stores[@]}" -- --ioengine=nbd --uri="nbd://127.0.0.1:$port/r0"
  stop "$pid" 150
}

# ---------------------------------------------------------------------------- main

WORK=$(mktemp -d "$PARENT/peers.XXXXXX")
[[ $WORK != *,* ]] || die "the work directory $WORK has a comma (QEMU's options cannot take it)"
FSTYPE=$(findmnt -no FSTYPE --target "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
[[ $FSTYPE != tmpfs ]] || die "$PARENT is on tmpfs: O_DIRECT and the raw row would mean nothing; use --dir"
mkdir "$WORK/fio"
A="$WORK/a.img" B="$WORK/b.img" RESULTS="$WORK/results.jsonl"
: >"$RESULTS"

log "work directory $WORK ($FSTYPE); $SIZE images; ${RUNTIME}s after ${RAMP}s ramp per workload"
fill "$A"
wants mirror && fill "$B"
QEMU_AIO=io_uring
if wants qemu-nbd || wants mirror; then
  timeout 30 qemu-io -f raw -t none -i io_uring -c 'read 0 4k' "$A" >/dev/null 2>&1 ||
    QEMU_AIO=native
fi

for ((ROUND = 1; ROUND <= REPEAT; ROUND++)); do
  for target in "${TARGET_LIST[@]}"; do
    log "round $ROUND/$REPEAT: $target"
    case $target in
      raw) target_raw ;;
      nbdkit) target_nbdkit ;;
      qemu-nbd) target_qemu_nbd ;;
      mirror) target_mirror ;;
      ours) target_ours ours ;;
      ours-pair) target_ours ours-pair "$B" ;;
    esac
  done
done

commit=unknown
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  commit="$(git -C "$REPO" rev-parse --short=12 HEAD) $(git -C "$REPO" log -1 --format='"%s"')"
  git -C "$REPO" diff --quiet HEAD -- 2>/dev/null || commit+=" (uncommitted changes)"
fi
versions="$(fio --version)"
wants nbdkit && versions+="; $(nbdkit --version | head -n 1)"
if wants qemu-nbd || wants mirror; then
  versions+="; $(qemu-nbd --version | head -n 1 | cut -d' ' -f1-2) (aio=$QEMU_AIO)"
fi
if wants ours || wants ours-pair; then versions+="; $("$REPLCTL" --version)"; fi
versions+="; Linux $(uname -r); $(nproc) CPUs; images on $FSTYPE"

notes=(
  "note_raw=fio io_uring O_DIRECT on the image file, no server: the disk's limit"
  "note_nbdkit=nbdkit file plugin: writes stay in the host page cache until a FLUSH; the ceiling of NBD over loopback, not a like-for-like durable peer"
  "note_qemu-nbd=qemu-nbd --cache=none --aio=$QEMU_AIO: every write reaches the disk (O_DIRECT), one node"
  "note_mirror=qemu-storage-daemon + blockdev-mirror sync=full copy-mode=write-blocking to qemu-nbd --cache=none over loopback TCP, measured READY and actively synced, B == A checked after: QEMU's synchronous replication, the like-for-like peer of ours-pair"
  "note_ours=replctl serve: one replicad node (journal, checksums, O_DIRECT data); exports the image minus its metadata"
  "note_ours-pair=replctl serve --peer-disk: a sync pair on loopback; a write completes once in both journals, a FLUSH once durable on both"
)
meta=()
for item in "command=$COMMAND_LINE" "commit=$commit" "versions=$versions" \
  "size_bytes=$BYTES" "runtime_s=$RUNTIME" "ramp_s=$RAMP" "repeat=$REPEAT" "flush_qd=$FLUSH_QD" \
  "targets=$TARGETS" "workloads=$WORKLOADS" "qemu_aio=$QEMU_AIO" "${notes[@]}"; do
  meta+=(--meta "$item")
done
if ((JSON)); then
  helper report "$RESULTS" --json "${meta[@]}"
else
  helper report "$RESULTS" "${meta[@]}"
fi
