#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# One entry point for a fresh Debian 12 machine (run as root from a clone):
#   ./scripts/setup.sh demo   install what is missing, build, run the demo
#   ./scripts/setup.sh test   install what is missing, build, run every suite:
#                             unit, integration, workflows, crash and
#                             fuzz-regress (normal build) together with the
#                             same under valgrind (trimmed: see
#                             tests/meson.build), all in parallel; then the
#                             same under ASan+UBSan, gcc -fanalyzer on lib/,
#                             and a fuzz smoke run (both harnesses at once)
# Environment: QBM_FUZZ_SECONDS (default 60 per harness), QBM_SKIP_FUZZ=1,
# QBM_SKIP_ASAN=1, QBM_SKIP_VALGRIND=1 (for quick local runs; CI runs
# everything).
set -euo pipefail

cd "$(dirname "$0")/.."
top=$(pwd)

packages=(meson ninja-build pkg-config gcc clang libclang-rt-14-dev
          zlib1g-dev libzstd-dev libxml2-dev libcmocka-dev clang-format
          qemu-utils libnbd-bin python3 python3-dev python3-pytest time
          valgrind)

install_missing() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
            grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing: ${missing[*]}"
        if [ "$(id -u)" -ne 0 ]; then
            echo "setup.sh: need root to install packages" >&2
            exit 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q "${missing[@]}"
    fi
}

build() { # build DIR [meson options...]
    local dir=$1
    shift
    if [ ! -f "$dir/build.ninja" ]; then
        meson setup "$dir" "$@"
    fi
    ninja -C "$dir"
}

passed=0
failed=0
# Background jobs: name -> pid; their output goes to $logs/NAME.
declare -A bg=()
logs=
# Run a command (or function) in the background at the lowest CPU
# priority, so that it takes only what the tests leave idle.
background() { # name command...
    local name=$1
    shift
    ( renice -n 19 -p "$BASHPID" >/dev/null; "$@" ) >"$logs/$name" 2>&1 &
    bg[$name]=$!
}
# Wait for a background job: its exit status; its output when it failed.
collect() { # name
    local rc=0
    wait "${bg[$1]}" || rc=$?
    unset "bg[$1]"
    if [ "$rc" -ne 0 ]; then
        cat "$logs/$1"
        echo "$1: exit $rc"
    fi
    return "$rc"
}
stop_background() {
    local pid
    for pid in "${bg[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    if [ -n "$logs" ]; then
        rm -rf "$logs"
    fi
}
count() { # status: one check passed or failed
    if [ "$1" -eq 0 ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
}
analyze() {
    if [ ! -f build-analyzer/build.ninja ]; then
        CFLAGS=-fanalyzer meson setup build-analyzer -Dtests=false \
            -Dwerror=true >/dev/null
    fi
    ninja -C build-analyzer lib/libqbm-internal.a
}
# Run meson test and add its Ok/Fail counts to the totals.
run_suite() { # label (or "") dir [meson test args...]
    local label=$1 dir=$2 log rc
    shift 2
    if [ -n "$label" ]; then
        echo "== $label"
    fi
    log=$(mktemp)
    set +e
    meson test -C "$dir" --print-errorlogs "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local ok fail
    ok=$(awk '/^Ok:/ {print $2}' "$log" | tail -n1)
    fail=$(awk '/^(Fail|Timeout|Unexpected Pass):/ {s += $NF} END {print s+0}' "$log")
    rm -f "$log"
    passed=$((passed + ${ok:-0}))
    failed=$((failed + ${fail:-0}))
    if [ "$rc" -ne 0 ] && [ "${fail:-0}" -eq 0 ]; then
        failed=$((failed + 1))
    fi
}

cmd=${1:-}
case "$cmd" in
demo)
    install_missing
    build build
    QBM="$top/build/tools/qbm" bash scripts/demo.sh
    ;;
test)
    install_missing
    logs=$(mktemp -d)
    trap stop_background EXIT
    echo "== build"
    build build
    # The other trees build meanwhile, in the CPU time the tests leave
    # idle; the static analysis is such a build.
    asan=$([ "${QBM_SKIP_ASAN:-0}" = 1 ] || echo 1)
    fuzz=$([ "${QBM_SKIP_FUZZ:-0}" = 1 ] || [ ! -x fuzz/run-smoke.sh ] ||
           echo 1)
    if [ -n "$asan" ]; then
        background build-asan build build-asan \
            -Db_sanitize=address,undefined -Db_lundef=false
    fi
    background analyzer analyze
    if [ -n "$fuzz" ]; then
        background build-fuzz fuzz/run-smoke.sh build
    fi
    if [ "${QBM_SKIP_VALGRIND:-0}" != 1 ]; then
        run_suite "unit, integration, workflows, crash and fuzz-regress;"\
" valgrind (the same under memcheck, trimmed); all in parallel" build \
            --setup valgrind
    else
        run_suite "unit, integration, workflows, crash and fuzz-regress" build
    fi
    if [ -n "$asan" ]; then
        echo "== the same under ASan+UBSan"
        if collect build-asan; then
            ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
                run_suite "" build-asan
        else
            count 1
        fi
    fi
    echo "== format of lib/ and tools/ (clang-format --dry-run --Werror)"
    rc=0
    scripts/format-check.sh || rc=$?
    count $rc
    echo "== static analysis of lib/ (gcc -fanalyzer, warnings are errors)"
    rc=0
    collect analyzer || rc=$?
    if [ "$rc" -eq 0 ]; then
        tail -n 1 "$logs/analyzer"
    fi
    count $rc
    if [ -n "$fuzz" ]; then
        echo "== fuzz smoke run"
        rc=0
        collect build-fuzz && fuzz/run-smoke.sh "${QBM_FUZZ_SECONDS:-60}" ||
            rc=$?
        count $rc
    fi
    echo "tests: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    ;;
*)
    echo "usage: $0 demo|test" >&2
    exit 2
    ;;
esac
