#!/usr/bin/env bash
# Issue 29's GPU measurements on a GPU machine without this project installed (the device tool's), in
# parts. Each part writes OUT_DIR/PART.log; the benchmark's rows go to OUT_DIR/generate.jsonl as they
# finish, so a call cut short keeps what it finished, and parts run on one warm machine add up to one
# run (docs/PERFORMANCE.md, "Generation against fla's model").
#
#   bash benchmarks/generate_gpu.sh OUT_DIR PART...
#
#   tests    the GPU tests of decoding and of the transformers model (tests/test_prism_decode.py,
#            tests/test_decoding.py, tests/test_hf.py)
#   profile  benchmarks/generate.py --profile: each model's decode step at batch 1, and its prefill of 32K
#            tokens against its forward of them without a cache, under the profiler
#   prism    benchmarks/generate.py --models prism (about 2 minutes)
#   fla      benchmarks/generate.py --models fla-gdn (over 5 minutes on a fresh machine: its kernels
#            compile and autotune for each new prefill shape)
#
# Carry .whl (shared/device/fetch-wheels.sh). `tests` also needs transformers at the version this
# project requires, which the GPU image lacks (it has 5.17, for fla's models, which keep it): its
# wheels in .whl/hf, installed apart from the rest. On this project's machine:
#   pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl/hf 'transformers==5.25.0'
# then delete from .whl/hf what the image has (numpy, pyyaml, pydantic*, annotated_types,
# typing_inspection, packaging, tqdm, typing_extensions, filelock, fsspec): 28 MB remain.
set -u
usage="usage: bash benchmarks/generate_gpu.sh OUT_DIR tests|profile|prism|fla ..."
out=${1:?$usage}
shift
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
for part in "$@"; do
    case "$part" in tests|profile|prism|fla) ;; *) echo "$usage" >&2; exit 2 ;; esac
done
out=$(mkdir -p "$out" && cd "$out" && pwd)
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$root/.triton_cache} TRITON_CACHE_AUTOTUNING=1

bench() {
    python3 benchmarks/generate.py --json "$out/generate.jsonl" "$@"
}
status=0
for part in "$@"; do
    case "$part" in
    tests)
        ls "$root"/.whl/hf/transformers-*.whl > /dev/null 2>&1 \
            || { echo "generate_gpu.sh: tests needs transformers' wheels in .whl/hf (see the script's header)" >&2; exit 1; }
        python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/prism_hf_site \
            "$root"/.whl/hf/*.whl || exit 1
        PYTHONPATH="/tmp/prism_hf_site:$PYTHONPATH" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short \
            -W ignore tests/test_prism_decode.py tests/test_decoding.py tests/test_hf.py ;;
    profile) bench --profile ;;
    prism) bench --models prism ;;
    fla) bench --models fla-gdn ;;
    esac > "$out/$part.log" 2>&1 || status=1
    grep " | \|passed\|failed" "$out/$part.log"
done
exit "$status"
