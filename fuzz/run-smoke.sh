#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Builds the libFuzzer harnesses with clang and runs each for SECONDS
# (default 60) from a copy of the seed corpus, both at once (one core
# each), and prints each one's executions, exec/s, peak RSS and final
# coverage (cov: edges, ft: features). A crash is copied to
# fuzz/reproducers/ (replayed by the normal test suite from then on) and
# makes the script fail. `run-smoke.sh build` only builds them.
set -euo pipefail
secs=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
build=$top/build-fuzz
if [ ! -f "$build/build.ninja" ]; then
    CC=clang meson setup "$build" "$top" -Dfuzzing=true -Dtests=false \
        -Db_lundef=false >/dev/null
fi
ninja -C "$build" >/dev/null
if [ "$secs" = build ]; then
    exit 0
fi
work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
harnesses=(fuzz-open fuzz-edit)
echo "== ${harnesses[*]} for ${secs}s, side by side"
for h in "${harnesses[@]}"; do
    mkdir -p "$work/$h" "$work/art-$h"
    cp "$here"/corpus/open/* "$here"/corpus/found-*/* "$work/$h/"
    "$build/fuzz/$h" -max_total_time="$secs" -max_len=262144 \
        -rss_limit_mb=2048 -timeout=10 -dict="$here/qcow2.dict" \
        -artifact_prefix="$work/art-$h/" -print_final_stats=1 \
        "$work/$h" 2>"$work/$h.log" &
    pids+=($!)
done
status=0
for i in "${!harnesses[@]}"; do
    h=${harnesses[$i]}
    if ! wait "${pids[$i]}"; then
        status=1
        cp "$work/art-$h"/* "$here/reproducers/" 2>/dev/null || true
        tail -40 "$work/$h.log"
        echo "$h: crash; reproducer copied to fuzz/reproducers/"
    fi
    # The last status line has the coverage (cov: edges, ft: features).
    last=$(grep -E '^#[0-9]+' "$work/$h.log" | tail -1 || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$h.log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$h.log")
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$work/$h.log")
    echo "$h: ${execs:-?} execs, ${rate:-?} exec/s, peak RSS ${rss:-?} MiB," \
        "$(echo "$last" | grep -oE 'cov: [0-9]+ ft: [0-9]+' || echo 'no coverage line')"
done
pids=()
exit $status
