#!/usr/bin/env bash
# The rounding spread (docs/QUALITY.md section 10) in one device call on a GPU machine without this
# project installed: the 125M prism L=2 run of shared/measurements/2026-12-06 at micro batches of 2, 4
# and 8, all three at once on one card (benchmarks/plans/rounding-125m.yaml through
# benchmarks/quality.py), and beside them the training-curve guard on the GPU: `update` (its golden
# file), then the same run again and at micro batches of 1, 2 and 8 (rounding-only changes), whose
# spread sets the guard's GPU tolerance.
#
#   bash benchmarks/rounding_gpu.sh OUT_DIR [quality.py arguments, e.g. --time-limit 420]
#
# Carry .whl (shared/device/fetch-wheels.sh). The store is built there as the measurement's was
# (benchmarks/py40_store.sh).
# OUT_DIR gets corpus.log, quality.log and the plan's quality.md, quality.json and quality.png,
# quality-metrics.tgz (every run's metrics), guard.log, curves-gpu.json and guard-mbN.json.
set -u
usage="usage: bash benchmarks/rounding_gpu.sh OUT_DIR [quality.py arguments]"
out=${1:?$usage}
shift
out=$(mkdir -p "$out" && cd "$out" && pwd)
source "$(dirname "$0")/gpu_env.sh"

guard() {
    python3 benchmarks/training_curve.py update --device gpu && cp tests/golden/curves-gpu.json "$out"/ || return 1
    for mb in 2 4 8 1; do  # 4 is the pinned run again
        python3 benchmarks/training_curve.py run --device gpu --set training.micro_batch_size=$mb \
            --set logging.eval_steps=$((16 / mb)) > "$out/guard-mb$mb.json" || return 1
    done
}
guard > "$out/guard.log" 2>&1 &
guard_pid=$!

bash benchmarks/py40_store.sh runs/py40 > "$out/corpus.log" 2>&1 || { tail -5 "$out/corpus.log"; exit 1; }
grep -h "corpus:\|documents from" "$out/corpus.log"

python3 benchmarks/quality.py benchmarks/plans/rounding-125m.yaml --out runs/quality --parallel 3 "$@" 2>&1 \
    | tee "$out/quality.log"
status=${PIPESTATUS[0]}
cp runs/quality/rounding-125m/quality.{md,json,png} "$out"/
find runs/quality/runs \( -name run.json -o -name metrics.jsonl \) -print0 2>/dev/null \
    | tar czf "$out/quality-metrics.tgz" --null -T -
wait $guard_pid
echo "guard: exit code $?"
tail -4 "$out/guard.log"
exit "$status"
