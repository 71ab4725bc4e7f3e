#!/usr/bin/env bash
# cache-reads.sh - random 4 KiB reads spread over a large volume, once with a checksum
# cache far smaller than the checksum table and once with one that holds it whole.
#
#   benches/cache-reads.sh                         # 1T, caches 16M and 2G, 20 s each, 3 rounds
#   SIZE=1T CACHES=16M,64M,2G RUNTIME=20 ROUNDS=3 REPLCTL=target/release/replctl benches/cache-reads.sh
#
# One node (`replctl serve --zeroed`) on a sparse image file of SIZE under DIR (default
# /var/tmp; never tmpfs), one fio client (nbd engine, randread, bs 4k, iodepth 32, the
# whole volume), the cache's hits and misses from `replctl status --json` before and
# after. The rounds alternate the caches; the table shows every round and the median.
# The volume was never written: every block reads as zeroes from holes, so what is
# measured is the daemon's read path and the table lookups, not the disk.
set -euo pipefail

SIZE=${SIZE:-1T}
CACHES=${CACHES:-16M,2G}
RUNTIME=${RUNTIME:-20}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-3}
DIR=${DIR:-/var/tmp}
REPLCTL=${REPLCTL:-target/release/replctl}

. "$(dirname "$0")/lib.sh"
bench_setup cache-reads.sh fio nbdinfo python3
image=$work/volume.img
truncate -s "$SIZE" "$image"

# cache_counters CONTROL -> "hits misses resident_bytes"
cache_counters() {
    "$REPLCTL" --control "$1" status r0 --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
s = s[0] if isinstance(s, list) else s
s = s.get("resources", [s])[0] if "resources" in s else s
c = s["io"]["checksum_cache"]
print(c["hits"], c["misses"], c["resident_bytes"])'
}

results=$work/results.tsv
IFS=, read -r -a caches <<<"$CACHES"
for round in $(seq 1 "$ROUNDS"); do
    for cache in "${caches[@]}"; do
        port=$(free_port)
        serve_dir=$work/serve-$round-$cache
        start_serve "$work/serve.log" "nbd://127.0.0.1:$port/r0" --disk "$image" \
            --nbd "127.0.0.1:$port" --dir "$serve_dir" --zeroed --checksum-cache "$cache"
        control=$serve_dir/alpha.ctl
        read -r hits0 misses0 _ < <(cache_counters "$control")
        fio --name=rr --ioengine=nbd --uri="nbd://127.0.0.1:$port/r0" --rw=randread --bs=4k \
            --iodepth=32 --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
            --output-format=json --output="$work/fio.json" >/dev/null
        read -r hits1 misses1 resident < <(cache_counters "$control")
        iops=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' "$work/fio.json")
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$cache" "$iops" \
            "$((hits1 - hits0))" "$((misses1 - misses0))" "$resident" >>"$results"
        stop_serve
    done
done

python3 - "$results" "$SIZE" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
print(f"random 4 KiB reads at QD32 over a {sys.argv[2]} volume (never written)\n")
print("| round | checksum-cache | IOPS | hit rate (this run) | cache resident after |")
print("|---:|---|---:|---:|---:|")
for r, cache, iops, hits, misses, resident in rows:
    lookups = int(hits) + int(misses)
    rate = int(hits) / lookups * 100 if lookups else 100.0
    print(f"| {r} | {cache} | {int(iops)} | {rate:.1f} % | {int(resident) >> 20} MiB |")
print()
by = {}
for r, cache, iops, *_ in rows:
    by.setdefault(cache, []).append(int(iops))
base = None
for cache, values in by.items():
    median = statistics.median(values)
    base = base or median
    print(f"median {cache}: {median:.0f} IOPS ({median / base:.2f}x the first cache)")
PY
