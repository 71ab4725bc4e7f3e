#!/usr/bin/env bash
# read-balance-bench.sh - random 4 KiB reads at QD32 against a replicad Primary, per
# read-balancing policy, with the Primary's store slowed and with equal stores.
#
# Both stores are loop devices (losetup --direct-io=on) on image files in a private
# work directory. "slowed": the Primary daemon runs in a cgroup whose I/O limit caps
# read IOPS on its loop device (cgroup v2 io.max riops=N where the io controller is in
# the unified hierarchy, else cgroup v1 blkio.throttle.read_iops_device - the same
# block-layer throttle). "equal": no limit. For each scenario, round and policy a
# fresh pair is created (zeroed stores, new-current-uuid --clear-bitmap), the read
# region filled with 1 MiB writes, then fio's nbd engine runs randread bs=4k
# iodepth=32 against the Primary. Prints IOPS per run, the median IOPS per policy over
# the rounds, and per round the ratio to prefer-local measured in that same round.
#
# Needs root, fio with the nbd engine, jq, losetup. Everything it starts is tracked
# by PID and removed on exit (daemons, cgroup, loop devices, work dir).
set -euo pipefail

usage() {
  cat <<EOF
usage: $0 [options]
  --bin DIR          directory holding replicad and replctl (default: target/release)
  --size SIZE        image size per node (default 1G)
  --region SIZE      bytes filled and read at random (default 256M)
  --runtime SECS     measured seconds per run (default 10)
  --ramp SECS        unmeasured warm-up per run (default 2)
  --riops N          read IOPS limit of the slowed Primary's store (default 2000)
  --policies LIST    comma list (default prefer-local,round-robin,adaptive,least-pending)
  --scenarios LIST   comma list from slowed,equal (default slowed,equal)
  --repeat N         rounds, interleaved (default 3)
  --dir DIR          parent of the work dir (default /var/tmp; not tmpfs)
EOF
}

BIN=target/release SIZE=1G REGION=256M RUNTIME=10 RAMP=2 RIOPS=2000 REPEAT=3 PARENT=/var/tmp
POLICIES=prefer-local,round-robin,adaptive,least-pending SCENARIOS=slowed,equal
while (($#)); do
  case $1 in
    --bin) BIN=$2; shift ;;          --size) SIZE=$2; shift ;;
    --region) REGION=$2; shift ;;    --runtime) RUNTIME=$2; shift ;;
    --ramp) RAMP=$2; shift ;;        --riops) RIOPS=$2; shift ;;
    --policies) POLICIES=$2; shift ;; --scenarios) SCENARIOS=$2; shift ;;
    --repeat) REPEAT=$2; shift ;;    --dir) PARENT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

[[ $(id -u) == 0 ]] || { echo "needs root (loop devices, cgroups)" >&2; exit 1; }
for tool in fio jq losetup; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio lacks the nbd engine" >&2; exit 1; }
REPLICAD=$(realpath "$BIN/replicad") REPLCTL=$(realpath "$BIN/replctl")
[[ -x $REPLICAD && -x $REPLCTL ]] || { echo "no replicad/replctl in $BIN (cargo build --release)" >&2; exit 1; }

WORK=$(mktemp -d "$PARENT/read-balance-bench.XXXXXX")
LOOPS=() PIDS=() CGROUP=
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n $CGROUP && -d $CGROUP ]]; then rmdir "$CGROUP" 2>/dev/null || true; fi
  for loop in "${LOOPS[@]}"; do losetup -d "$loop" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for node in alpha beta; do
  truncate -s "$SIZE" "$WORK/$node.img"
  LOOPS+=("$(losetup --find --show --direct-io=on "$WORK/$node.img")")
done
ALPHA_DEV=${LOOPS[0]} BETA_DEV=${LOOPS[1]}
ALPHA_MAJMIN=$(lsblk -dno MAJ:MIN "$ALPHA_DEV" | tr -d ' ')

# The cgroup that slows the Primary's store.
if grep -qw io /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
  CGROUP=/sys/fs/cgroup/read-balance-bench-$$
  mkdir "$CGROUP"
  echo "$ALPHA_MAJMIN riops=$RIOPS" > "$CGROUP/io.max"
  LIMIT="cgroup v2 io.max $ALPHA_MAJMIN riops=$RIOPS"
elif [[ -f /sys/fs/cgroup/blkio/blkio.throttle.read_iops_device ]]; then
  CGROUP=/sys/fs/cgroup/blkio/read-balance-bench-$$
  mkdir "$CGROUP"
  echo "$ALPHA_MAJMIN $RIOPS" > "$CGROUP/blkio.throttle.read_iops_device"
  LIMIT="cgroup v1 blkio.throttle.read_iops_device $ALPHA_MAJMIN $RIOPS"
else
  echo "no cgroup I/O controller (v2 io or v1 blkio)" >&2; exit 1
fi

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Polls `replctl status --json` of $1 until jq filter $2 holds, at most $3 seconds.
wait_status() {
  local node=$1 filter=$2 limit=$3 waited=0
  until "$REPLCTL" status r0 --json --config "$WORK/replicad.toml" --node "$node" 2>/dev/null \
      | jq -e "$filter" >/dev/null 2>&1; do
    ((waited < limit * 10)) || { echo "timed out waiting for $node: $filter" >&2; tail -5 "$WORK/$node.log" >&2; exit 1; }
    sleep 0.1; waited=$((waited + 1))
  done
}

# Starts a fresh in-sync pair with read-balancing $1; the Primary in the cgroup if $2.
start_pair() {
  local policy=$1 slowed=$2
  NBD_PORT=$(port)
  cat > "$WORK/replicad.toml" <<EOF
[resource.r0]
mode = "sync"
journal-size = "64M"
read-balancing = "$policy"
[resource.r0.nodes.alpha]
address = "127.0.0.1:$(port)"
disk = "$ALPHA_DEV"
nbd = "127.0.0.1:$NBD_PORT"
control = "$WORK/alpha.ctl"
[resource.r0.nodes.beta]
address = "127.0.0.1:$(port)"
disk = "$BETA_DEV"
nbd = "127.0.0.1:$(port)"
control = "$WORK/beta.ctl"
EOF
  PIDS=()
  for node in alpha beta; do
    "$REPLCTL" create-md r0 --force --config "$WORK/replicad.toml" --node "$node" >/dev/null
    setpriv --pdeathsig TERM "$REPLICAD" --config "$WORK/replicad.toml" --node "$node" \
      >"$WORK/$node.log" 2>&1 &
    PIDS+=($!)
  done
  if [[ $slowed == 1 ]]; then
    echo "${PIDS[0]}" > "$CGROUP/cgroup.procs"
  fi
  wait_status alpha '.[0].peer.connection == "Connected"' 30
  "$REPLCTL" new-current-uuid r0 --clear-bitmap --config "$WORK/replicad.toml" --node alpha >/dev/null
  "$REPLCTL" promote r0 --config "$WORK/replicad.toml" --node alpha >/dev/null
  wait_status alpha '.[0].role == "Primary" and .[0].peer.peer_disk == "UpToDate" and .[0].out_of_sync_bytes == 0' 60
}

stop_pair() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

# Fills the read region (so reads hit written blocks), then measures; prints IOPS.
measure() {
  local uri=nbd://127.0.0.1:$NBD_PORT
  fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 \
    --size="$REGION" --output-format=terse >/dev/null
  fio --name=rr --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 \
    --size="$REGION" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
    --output-format=json --output="$WORK/fio.json" >/dev/null
  jq '.jobs[0].read.iops | floor' "$WORK/fio.json"
}

echo "# read-balance-bench: $(nproc) CPUs, $(uname -r), slowed: $LIMIT"
echo "# randread 4k QD32 over $REGION, ${RUNTIME}s after ${RAMP}s, fio nbd engine, sync pair on loop devices"
printf "%-8s %-6s %-16s %10s %8s %14s\n" scenario round policy iops ratio peer-served
declare -A IOPS
IFS=, read -ra POLICY_LIST <<<"$POLICIES"
IFS=, read -ra SCENARIO_LIST <<<"$SCENARIOS"
for round in $(seq 1 "$REPEAT"); do
  for scenario in "${SCENARIO_LIST[@]}"; do
    slowed=0; [[ $scenario == slowed ]] && slowed=1
    for policy in "${POLICY_LIST[@]}"; do
      start_pair "$policy" "$slowed"
      iops=$(measure)
      served=$("$REPLCTL" status r0 --json --config "$WORK/replicad.toml" --node alpha \
        | jq '.[0].peer.reads_served')
      stop_pair
      IOPS[$scenario,$round,$policy]=$iops
      base=${IOPS[$scenario,$round,prefer-local]:-}
      ratio=-
      [[ -n $base && $base != 0 ]] && ratio=$(jq -n "$iops / $base * 100 | floor / 100")
      printf "%-8s %-6s %-16s %10s %8s %14s\n" "$scenario" "$round" "$policy" "$iops" "$ratio" "$served"
    done
  done
done

echo
echo "# medians over $REPEAT rounds (ratio: median of the per-round ratios to prefer-local)"
printf "%-8s %-16s %10s %8s\n" scenario policy iops ratio
for scenario in "${SCENARIO_LIST[@]}"; do
  for policy in "${POLICY_LIST[@]}"; do
    values=() ratios=()
    for round in $(seq 1 "$REPEAT"); do
      values+=("${IOPS[$scenario,$round,$policy]}")
      base=${IOPS[$scenario,$round,prefer-local]:-0}
      ((base > 0)) && ratios+=("$(jq -n "${IOPS[$scenario,$round,$policy]} / $base")")
    done
    median=$(printf "%s\n" "${values[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    ratio=$(printf "%s\n" "${ratios[@]:-}" | sort -g | awk '{a[NR]=$1} END {if (NR) printf "%.2f", a[int((NR+1)/2)]; else print "-"}')
    printf "%-8s %-16s %10s %8s\n" "$scenario" "$policy" "$median" "$ratio"
  done
done
