#!/usr/bin/env bash
# Issue 14's measurements on a GPU machine without this project installed (the device tool's): the
# wheels of shared/device/fetch-wheels.sh (carry .whl), a token store of the standard library's
# sources, then benchmarks/model_step.py in parts. Each part writes OUT_DIR/PART.log and appends its
# rows to OUT_DIR/results.jsonl as they finish, so a call cut short keeps what it finished.
#
#   bash benchmarks/model_step_gpu.sh OUT_DIR PART...
#
#   main     fla's GatedDeltaNetForCausalLM, PRISM L=3 and L=2 and `solver: none`: the headline ratios
#   profile  PRISM L=3, `solver: none` and fla's GatedDeltaNetForCausalLM in one run, with --profile
#            (phases, top kernels, operators by shape, the optimizer step's host time)
#   matrix   fla's model, then L=3, L=1 and none in each recompute mode, then L=3 with fused_ops off
#            (last: a call cut short at the device's time limit loses the least), one run
#   2.7b     the 2.7B preset on one GPU (TP=1, no SP) with selective and with full recomputation
#   125m     the 125M preset at its micro batch (8 x 2048): fla's model of the same width and depth,
#            `solver: none`, PRISM L=2 and L=3, with --profile, 12 timed steps (each one's time printed)
#            after 5 untimed ones (after 2, the third step took 0.9-1.7 s in each PRISM variant; after 4
#            none was slow); then the same at its global batch in one micro batch (32 x 2048)
#
# On a fresh H200 fla's model compiles and autotunes for about 3 minutes; TRITON_CACHE_DIR (default:
# .triton_cache in the checkout) keeps that for later calls on the same warm machine. Each call also
# leaves OUT_DIR/autotune.tgz, the autotuners' choices in that cache; carried to a fresh machine of
# the same image as runs/autotune.tgz, it spares the autotuning there. `profile` takes about 5
# minutes on a fresh machine, `matrix` about 6 and `2.7b` 2.
set -u
usage="usage: bash benchmarks/model_step_gpu.sh OUT_DIR main|profile|matrix|2.7b|125m ..."
out=${1:?$usage}
shift
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
for part in "$@"; do
    case "$part" in main|profile|matrix|2.7b|125m) ;; *) echo "$usage" >&2; exit 2 ;; esac
done
out=$(mkdir -p "$out" && cd "$out" && pwd)
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$root/.triton_cache} TRITON_CACHE_AUTOTUNING=1
# A step that recompiles shows in the part's log beside the steps' times.
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
if [ -f "$root/runs/autotune.tgz" ]; then
    mkdir -p "$TRITON_CACHE_DIR" && tar xzf "$root/runs/autotune.tgz" -C "$TRITON_CACHE_DIR" --skip-old-files || exit 1
fi
store=/tmp/model_step/store
# A warm machine keeps the store of an earlier call (the marker says it was finished).
if [ ! -f /tmp/model_step/built ]; then
    rm -rf /tmp/model_step
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from model_step import build_store; build_store(Path('/tmp/model_step'))" > "$out/store.log" 2>&1 \
        || { tail -5 "$out/store.log"; exit 1; }
    touch /tmp/model_step/built
fi

step() {  # model_step.py with the common arguments
    python3 benchmarks/model_step.py --store "$store" --warmup 2 --steps 4 --json "$out/results.jsonl" "$@"
}
status=0
for part in "$@"; do
    case "$part" in
    main) step --timeout 300 --variants fla-gdn prism-L3 prism-L2 solver-none ;;
    profile) step --profile --timeout 300 --variants prism-L3 solver-none fla-gdn ;;
    matrix) step --timeout 120 --variants fla-gdn prism-L3 prism-L3-selective prism-L3-full prism-L1 \
                prism-L1-selective prism-L1-full solver-none solver-none-selective solver-none-full \
                prism-L3-reference ;;
    2.7b) step --timeout 200 --config launch/configs/2.7b.yaml --set parallel.tensor_model_parallel_size=1 \
              --set parallel.sequence_parallel=false --variants prism-L3-selective prism-L3-full ;;
    125m) step --profile --timeout 200 --warmup 5 --steps 12 --config launch/configs/125m.yaml --batch 8 2048 \
              --variants fla-gdn solver-none prism-L2 prism-L3
          step --timeout 200 --warmup 5 --steps 8 --config launch/configs/125m.yaml --batch 32 2048 \
              --variants fla-gdn solver-none prism-L2 prism-L3 ;;
    esac > "$out/$part.log" 2>&1 || status=1
    grep "tokens/s\|FAILED" "$out/$part.log"
done
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar czf "$out/autotune.tgz" --null -T -)
exit "$status"
