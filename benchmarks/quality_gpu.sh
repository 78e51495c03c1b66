#!/usr/bin/env bash
# One call of the quality comparison (docs/QUALITY.md) on a GPU machine without this project
# installed (the device tool's): installs the wheels of shared/device/fetch-wheels.sh, makes the store
# the plan trains on (runs/py40/store: built there from the machine's own sources,
# benchmarks/py40_store.sh; otherwise runs/code-corpus/store: the code corpus rebuilt from
# runs/code-corpus/carry and checked against the store made where carry/ was, benchmarks/code_corpus.py),
# unpacks the metrics of runs finished in earlier calls
# (runs/quality-metrics.tgz, if carried; a warm machine keeps its own, newer files), then runs
# benchmarks/quality.py on PLAN with --out runs/quality. The compiled kernels (Triton's and Inductor's
# caches) of an earlier call come in as runs/compile-cache.tgz, if carried, and go out as
# OUT_DIR/compile-cache.tgz: on a fresh machine of the same image they spare each run's first minute.
#
#   bash benchmarks/quality_gpu.sh OUT_DIR PLAN [quality.py arguments, e.g. --parallel 2 --time-limit 520]
#
# Carry .whl, runs/code-corpus/carry (for a plan on the code corpus) and, after the first call,
# runs/quality-metrics.tgz and runs/compile-cache.tgz. OUT_DIR gets
# corpus.log, quality.log (the harness's output), the plan's quality.md, quality.json and quality.png,
# quality-metrics.tgz (every run's run.json and metrics.jsonl) and compile-cache.tgz: put those in
# runs/ for the next call, which then skips the runs that finished. Runs cut short
# by --time-limit resume from their checkpoints only on the same (warm) machine.
set -u
usage="usage: bash benchmarks/quality_gpu.sh OUT_DIR PLAN [quality.py arguments]"
out=${1:?$usage}
plan=${2:?$usage}
shift 2
out=$(mkdir -p "$out" && cd "$out" && pwd)
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=$root/.compile_cache/triton TORCHINDUCTOR_CACHE_DIR=$root/.compile_cache/inductor
if [ -f "$root/runs/compile-cache.tgz" ]; then
    mkdir -p "$root/.compile_cache" && tar xzf "$root/runs/compile-cache.tgz" -C "$root/.compile_cache" --skip-old-files \
        || exit 1
fi

if grep -q "runs/py40/store" "$plan"; then
    bash benchmarks/py40_store.sh runs/py40 > "$out/corpus.log" 2>&1
else
    python3 benchmarks/code_corpus.py rebuild runs/code-corpus > "$out/corpus.log" 2>&1
fi || { tail -5 "$out/corpus.log"; exit 1; }
tail -1 "$out/corpus.log"
if [ -f runs/quality-metrics.tgz ]; then
    tar xzf runs/quality-metrics.tgz --skip-old-files || exit 1
fi

python3 benchmarks/quality.py "$plan" --out runs/quality "$@" 2>&1 | tee "$out/quality.log"
status=${PIPESTATUS[0]}
cp runs/quality/"$(basename "$plan" .yaml)"/quality.{md,json,png} "$out"/
find runs/quality/runs \( -name run.json -o -name metrics.jsonl \) -print0 2>/dev/null \
    | tar czf "$out/quality-metrics.tgz" --null -T -
tar czf "$out/compile-cache.tgz" -C "$root/.compile_cache" . 2>/dev/null
du -h "$out/compile-cache.tgz"
exit "$status"
