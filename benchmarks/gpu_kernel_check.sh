#!/usr/bin/env bash
# The Triton kernel's GPU check, for a GPU machine without this project installed (the device
# tool's): the GPU test matrix of tests/test_prism_triton.py split over parallel pytest processes
# (compiling the kernels dominates, and is CPU-bound), and benchmarks/prism_kernel.py. Everything is
# written under OUT_DIR as it happens, so a run cut short keeps what it finished.
#
#   bash benchmarks/gpu_kernel_check.sh OUT_DIR tests|bench|all [prism_kernel.py arguments]
#   bash benchmarks/gpu_kernel_check.sh OUT_DIR sweep "VARIANT ARGUMENTS" ["VARIANT ARGUMENTS" ...]
#
# `sweep` times each variant (prism_kernel.py arguments, e.g. "--shapes 2 --L 3 --warps wy_fwd=8") in a
# process of its own, without the DPLR baseline, so that a variant that faults costs only its own row.
#
# Needs the wheels of shared/device/fetch-wheels.sh in .whl/ (fla-core among them: without it the fla
# comparisons fail, they do not skip). Time limits in seconds: TEST_SECONDS (default 400; the float32
# cases at K = 128 and 256 compile for minutes) and BENCH_SECONDS (default 540); JOBS (default 12: the
# H200 machine has 16 cores, and fewer processes left the slowest one running long after the others)
# parallel test processes; TESTS_K, a pytest -k expression, runs only the tests it selects. The device
# tool gives one command 10 minutes: `all` fits in one with TEST_SECONDS=470 and BENCH_SECONDS=100
# (timings in docs/PERFORMANCE.md).
#
# fla's kernels autotune on their first call, compiling dozens of configurations (minutes per
# shape). Compiled kernels are kept in TRITON_CACHE_DIR (default: .triton_cache in the checkout,
# which a later call finds on a warm machine), so `tests` also runs the benchmark's fla calls once
# alongside the test processes, to compile them; their timings there are thrown away (the GPU is
# shared with the tests), and `bench` then only times the configurations. `bench` keeps its autotuning
# choices in TRITON_CACHE_DIR too, and packs them into OUT_DIR/triton_autotune.tar, to unpack into
# .triton_cache for a later machine.
set -u
usage="usage: bash benchmarks/gpu_kernel_check.sh OUT_DIR tests|bench|all [prism_kernel.py arguments] | sweep VARIANT..."
out=${1:?$usage}
what=${2:?$usage}
shift 2
case "$what" in tests|bench|all|sweep) ;; *) echo "$usage" >&2; exit 2 ;; esac
out=$(mkdir -p "$out" && cd "$out" && pwd)
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$root/.triton_cache}
work=$(mktemp -d)

if [ "$what" = sweep ]; then
    i=0
    for variant in "$@"; do
        i=$((i + 1))
        # shellcheck disable=SC2086  # a variant is a list of arguments
        TRITON_CACHE_AUTOTUNING=1 timeout "${BENCH_SECONDS:-540}" python3 benchmarks/prism_kernel.py --no-dplr \
            --out "$out/sweep_$i.md" $variant > "$out/sweep_$i.log" 2>&1 || echo "variant $i failed: see sweep_$i.log"
        echo "variant $i: $variant"
        grep -h -v -E "^(Device|PRISM warps|\| shape|\| ---)" "$out/sweep_$i.md"
    done
    exit 0
fi

if [ "$what" != bench ]; then
    # The K = 128 shapes share fla's compiled kernels, so the first and last benchmark shapes cover them.
    for shape in 0 2; do
        timeout "${TEST_SECONDS:-400}" python3 benchmarks/prism_kernel.py --shapes "$shape" --L 1 \
            > "$out/fla_compile_$shape.log" 2>&1 &
    done
    python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_prism_triton.py ${TESTS_K:+-k "$TESTS_K"} \
        | grep :: > "$work/test_ids"
    split -n "r/${JOBS:-12}" "$work/test_ids" "$work/part_"
    for part in "$work"/part_*; do
        cp "$part" "$out/tests_$(basename "$part").txt"
        # shellcheck disable=SC2046  # one test id per word
        timeout "${TEST_SECONDS:-400}" python3 -m pytest -q -p no:cacheprovider -rfE $(cat "$part") \
            >> "$out/tests_$(basename "$part").txt" 2>&1 &
    done
    wait
    echo "tests (one file per process, packed into $out/tests.tar):"
    grep -h -E "passed|failed|^FAILED|^ERROR" "$out"/tests_part_*.txt
    for part in $(grep -L -E "passed|failed" "$out"/tests_part_*.txt); do
        echo "cut short by TEST_SECONDS: $(grep :: "$part" | tr '\n' ' ')"
    done
    # The device tool returns a limited number of files.
    (cd "$out" && tar -cf tests.tar tests_part_*.txt fla_compile_*.log && rm tests_part_*.txt fla_compile_*.log)
fi

if [ "$what" != tests ]; then
    TRITON_CACHE_AUTOTUNING=1 timeout "${BENCH_SECONDS:-540}" \
        python3 benchmarks/prism_kernel.py --out "$out/bench.md" "$@" > "$out/bench.log" 2>&1
    echo "benchmark ($out/bench.md, log in $out/bench.log):"
    cat "$out/bench.md"
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -cf "$out/triton_autotune.tar" --null -T -)
fi
