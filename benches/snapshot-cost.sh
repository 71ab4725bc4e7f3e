#!/usr/bin/env bash
# snapshot-cost.sh - what a live snapshot costs writers, and what an incremental backup
# saves, on a replicated pair.
#
#   benches/snapshot-cost.sh                       # 4G volume, 20 s runs, 3 rounds
#   SIZE=4G RUNTIME=20 ROUNDS=3 CHANGED_PCT=1 REPLCTL=target/release/replctl benches/snapshot-cost.sh
#
# A pair (`replctl serve --peer-disk --snapshots`, sync mode) on sparse image files
# under DIR (default /var/tmp; never tmpfs).
#
# 1. Write IOPS: fio (nbd engine, randwrite, bs 4k, iodepth 32, the whole volume) with
#    no snapshot and with one live snapshot on the Primary, rounds alternating; every
#    "snapshot" run starts from a fresh snapshot, so its first overwrites of blocks
#    all pay the copy-on-write (the worst case, not a steady state).
# 2. Backups: a full backup of snapshot s0; then CHANGED_PCT % of the blocks rewritten
#    (fio randwrite, each block once); snapshot s1; an incremental backup of s1 since s0.
#    Reported: the blocks the incremental copied against the blocks the dirty bitmap
#    lists, and the two backups' times.
# 3. Reads: fio randread (bs 4k, iodepth 32) of the live volume r0 and of the snapshot
#    export r0@s1, alternating, ROUNDS each (what a backup's scattered reads run into).
set -euo pipefail

SIZE=${SIZE:-4G}
RUNTIME=${RUNTIME:-20}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-3}
CHANGED_PCT=${CHANGED_PCT:-1}
DIR=${DIR:-/var/tmp}
REPLCTL=${REPLCTL:-target/release/replctl}

. "$(dirname "$0")/lib.sh"
bench_setup snapshot-cost.sh fio nbdinfo python3
truncate -s "$SIZE" "$work/alpha.img" "$work/beta.img"
port=$(free_port)
uri="nbd://127.0.0.1:$port/r0"
start_serve "$work/serve.log" "$uri" --disk "$work/alpha.img" --peer-disk "$work/beta.img" \
    --zeroed --snapshots --snapshot-area 64G --nbd "127.0.0.1:$port" --dir "$work/serve"
ctl() { "$REPLCTL" --control "$work/serve/alpha.ctl" "$@"; }

# fio_write RUNTIME|- [extra fio args...] -> IOPS
fio_write() {
    local limit=$1; shift
    local timing=(--time_based --runtime="$limit" --ramp_time="$RAMP")
    [ "$limit" = - ] && timing=()
    fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 \
        "${timing[@]}" "$@" --output-format=json --output="$work/fio.json" >/dev/null
    python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$work/fio.json"
}

results=$work/results.tsv
for round in $(seq 1 "$ROUNDS"); do
    printf '%s\tnone\t%s\n' "$round" "$(fio_write "$RUNTIME")" >>"$results"
    ctl snapshot create r0 "bench-$round" >/dev/null
    printf '%s\tsnapshot\t%s\n' "$round" "$(fio_write "$RUNTIME")" >>"$results"
    ctl snapshot list r0 --json >"$work/list-$round.json"
    ctl snapshot delete r0 "bench-$round" >/dev/null
done

ctl snapshot create r0 s0 >/dev/null
start=$(date +%s.%N)
ctl backup r0 --snapshot s0 --to "$work/full.bak" --json >"$work/full.json"
full_secs=$(python3 -c "import time; print(time.time() - $start)")
rm -f "$work/full.bak"
size_bytes=$(nbdinfo --size "$uri")
changed_bytes=$(( size_bytes / 4096 * CHANGED_PCT / 100 * 4096 ))
fio_write - --io_size="$changed_bytes" >/dev/null
ctl snapshot create r0 s1 >/dev/null
start=$(date +%s.%N)
ctl backup r0 --snapshot s1 --since s0 --to "$work/inc.bak" --json >"$work/inc.json"
inc_secs=$(python3 -c "import time; print(time.time() - $start)")
ctl snapshot list r0 --json >"$work/list-backup.json"

# fio_read URI -> IOPS
fio_read() {
    fio --name=r --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json --output="$work/fio.json" >/dev/null
    python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' "$work/fio.json"
}
reads=$work/reads.tsv
for round in $(seq 1 "$ROUNDS"); do
    printf '%s\tvolume\t%s\n' "$round" "$(fio_read "$uri")" >>"$reads"
    printf '%s\tsnapshot\t%s\n' "$round" "$(fio_read "$uri@s1")" >>"$reads"
done

python3 - "$results" "$SIZE" "$work" "$full_secs" "$inc_secs" "$changed_bytes" "$reads" <<'PY'
import json, statistics, sys
results, size, work, full_secs, inc_secs, changed_bytes, reads = sys.argv[1:]
rows = [line.split("\t") for line in open(results).read().splitlines()]
print(f"random 4 KiB writes at QD32 on a sync pair, {size} volume\n")
print("| round | snapshot | write IOPS |")
print("|---:|---|---:|")
for r, kind, iops in rows:
    print(f"| {r} | {kind} | {iops} |")
by = {}
for _, kind, iops in rows:
    by.setdefault(kind, []).append(int(iops))
none, snap = statistics.median(by["none"]), statistics.median(by["snapshot"])
print(f"\nmedian without a snapshot: {none:.0f} IOPS; with one: {snap:.0f} IOPS ({snap / none:.2f}x)")
snaps = json.load(open(f"{work}/list-backup.json"))["snapshots"]
s0 = next(s for s in snaps if s["name"] == "s0")
full = json.load(open(f"{work}/full.json"))
inc = json.load(open(f"{work}/inc.json"))
copied = inc["data_blocks"] + inc["zero_blocks"]
dirty = s0["changed_blocks"]
print(f"\nbackups of the {size} volume, {int(changed_bytes) >> 20} MiB rewritten ({dirty} blocks in s0's dirty set)")
print("| backup | blocks copied | file | time |")
print("|---|---:|---:|---:|")
print(f"| full (s0) | {full['data_blocks'] + full['zero_blocks']} | {full['file_bytes'] >> 20} MiB | {float(full_secs):.2f} s |")
print(f"| incremental (s1 since s0) | {copied} | {inc['file_bytes'] >> 20} MiB | {float(inc_secs):.2f} s |")
print(f"\nincremental: {copied / dirty:.3f}x the changed blocks, {float(inc_secs) / float(full_secs) * 100:.1f} % of the full backup's time")
rows = [line.split("\t") for line in open(reads).read().splitlines()]
by = {}
for _, kind, iops in rows:
    by.setdefault(kind, []).append(int(iops))
volume, snapshot = statistics.median(by["volume"]), statistics.median(by["snapshot"])
print("\nrandom 4 KiB reads at QD32: " + ", ".join(f"{k} {v}" for k, v in by.items()))
print(f"median r0: {volume:.0f} IOPS; r0@s1: {snapshot:.0f} IOPS ({snapshot / volume:.2f}x)")
PY
