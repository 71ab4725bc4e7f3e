#!/usr/bin/env bash
# Scale benchmark (issue 18): for each volume size, a sparse image file on the
# target directory's file system; `create-md --zeroed`, start, 4 KiB random writes
# (one NBD client, queue depth 1), the daemon's VmRSS, kill -9, restart, VmRSS again.
# Prints the Markdown table recorded in docs/BENCHMARKS.md ("Scale").
#
#   tools/scale.sh                      # 16G,1T,15T with 20000 writes each
#   SIZES=15T WRITES=1000 tools/scale.sh
#
# Needs a file system that takes 15 TiB sparse files (ext4 with 4 KiB blocks: up to
# 16 TiB) and little real space: only what is written is allocated.
set -euo pipefail
cd "$(dirname "$0")/.."
export REPLICAD_SCALE_SIZES="${SIZES:-16G,1T,15T}"
export REPLICAD_SCALE_WRITES="${WRITES:-20000}"
cargo test --release -p replicad-tools --test e2e_scale -- --nocapture --test-threads 1 2>&1 |
    grep -E '^\|' || { echo "scale run failed; rerun with: cargo test --release -p replicad-tools --test e2e_scale -- --nocapture" >&2; exit 1; }
