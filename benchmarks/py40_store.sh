#!/usr/bin/env bash
# The token store of shared/measurements/2026-12-06, made on the machine that trains on it (so nothing
# travels but the wheels): the first 40 MB of the machine's Python sources in
# benchmarks/code_corpus.py's order (the standard library, then the interpreter's site-packages), an
# 8,192-piece BPE tokenizer on 300,000 sampled lines, the store in DIR/store. The measurement's had
# 2,764 documents.
# A DIR that holds a store already (a warm machine's) is kept. Run from the repository root with the
# project importable (benchmarks/rounding_gpu.sh and quality_gpu.sh call it):
#
#   bash benchmarks/py40_store.sh DIR
set -u
data=${1:?usage: bash benchmarks/py40_store.sh DIR}
if [ -f "$data/store/manifest.json" ]; then
    echo "$data/store: kept"
    exit 0
fi
mkdir -p "$data"
python3 - "$data/corpus.jsonl" <<'PYTHON' || exit 1
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, "benchmarks")
from code_corpus import first_sources
from prism_megatron.launch.demo import write_corpus

write_corpus(first_sources(40_000_000, Path(sysconfig.get_paths()["purelib"])), Path(sys.argv[1]))
PYTHON
python3 -m prism_megatron.data_prep.cli tokenizer "$data/corpus.jsonl" --output "$data/tokenizer.model" \
    --vocab-size 8192 --sample-lines 300000 &&
python3 -m prism_megatron.data_prep.cli tokenize "$data/corpus.jsonl" --tokenizer "$data/tokenizer.model" \
    --output "$data/store" --workers 8
