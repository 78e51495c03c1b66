#!/usr/bin/env bash
# Issue 31's comparison across revisions (docs/QUALITY.md section 10): the run of
# shared/measurements/2026-12-06 (125M, prism L=2, 200 steps of 16 x 2048 tokens, micro batches of 4,
# seed 1234, bf16) trained by this checkout and by older revisions' trees, all at once on one GPU and
# on one store built there (benchmarks/py40_store.sh), so that what differs between their curves is
# the code's doing, not the store's or the machine's. Each tree trains with its own code and the
# wheels of shared/device/fetch-wheels.sh (carry .whl and runs/rev).
#
#   git archive -o runs/rev/REV.tar REV                  # here, once per older revision
#   bash benchmarks/revisions_gpu.sh OUT_DIR runs/rev/REV.tar ... [--set KEY=VALUE ...]
#
# --set overrides go to every run (the 800-step, 32-sequence settings: --set training.train_steps=800
# --set training.global_batch_size=32). OUT_DIR gets revisions.tgz: corpus.log and, per tree (`head`
# for this checkout, REV for an archive), NAME.log and NAME-metrics.jsonl, in one file because the
# device tool brings back at most 8; the last lines printed are each tree's validation losses.
set -u
usage="usage: bash benchmarks/revisions_gpu.sh OUT_DIR REV.tar ... [--set KEY=VALUE ...]"
out=${1:?$usage}
shift
archives=()
while [ $# -gt 0 ] && [ "$1" != "--set" ]; do
    [ -f "$1" ] || { echo "revisions_gpu: $1: no such archive ($usage)" >&2; exit 2; }
    archives+=("$(cd "$(dirname "$1")" && pwd)/$(basename "$1")")
    shift
done
overrides=("$@")
out=$(mkdir -p "$out" && cd "$out" && pwd)
source "$(dirname "$0")/gpu_env.sh"

bash benchmarks/py40_store.sh runs/py40 > "$out/corpus.log" 2>&1 || { tail -5 "$out/corpus.log"; exit 1; }
store=$root/runs/py40/store

trees=("head=$root")
for archive in "${archives[@]}"; do
    name=$(basename "$archive" .tar)
    rm -rf "/tmp/rev/$name" && mkdir -p "/tmp/rev/$name" && tar xf "$archive" -C "/tmp/rev/$name" || exit 1
    trees+=("$name=/tmp/rev/$name")
done

pids=()
for entry in "${trees[@]}"; do
    name=${entry%%=*} tree=${entry#*=}
    work=/tmp/revisions/$name
    rm -rf "$work"
    (cd "$tree" && PYTHONPATH="$tree:/tmp/prism_site" python3 -m prism_megatron.launch.train \
        --config launch/configs/125m.yaml --set "data.stores=[$store]" --set model.solver=prism \
        --set model.solver_steps=2 --set training.train_steps=200 --set training.global_batch_size=16 \
        --set training.micro_batch_size=4 --set optim.warmup_steps=40 --set logging.eval_interval=50 \
        --set logging.eval_steps=16 --set "checkpoint.dir=$work/checkpoints" \
        --set "logging.tensorboard_dir=$work/tensorboard" "${overrides[@]}" > "$out/$name.log" 2>&1
     cp "$work/tensorboard/metrics.jsonl" "$out/$name-metrics.jsonl") &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
for entry in "${trees[@]}"; do
    name=${entry%%=*}
    echo "$name:"
    grep "val loss" "$out/$name.log" | tail -5
done
(cd "$out" && tar czf revisions.tgz --remove-files ./*.log ./*-metrics.jsonl)
exit "$status"
