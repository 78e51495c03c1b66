"""The corpus of the quality runs (docs/QUALITY.md): this machine's Python sources, which no one here
wrote, as a 32,000-piece tokenizer and a token store, built here and rebuilt on the GPU machine from
what travels there (64 MiB a call, wheels included).

    python benchmarks/code_corpus.py build runs/code-corpus      # here: corpus, tokenizer, store, carry/
    python benchmarks/code_corpus.py rebuild runs/code-corpus    # there, with runs/code-corpus/carry carried

build: the .py files of the interpreter's library (the standard library and the packages installed
beside it) and of the running environment's site-packages, one JSON line {"text", "path"} per file
in path order, leaving out files seen before (same bytes), files over 1 MB (generated tables, not
code) and this project's own, up to CORPUS_BYTES; a BPE tokenizer trained on 1M lines sampled from
it; the token store; and DIR/carry/: the tokenizer, the corpus xz-compressed and the store's manifest.
rebuild: decompresses carry/corpus.jsonl.xz, tokenizes it with carry/tokenizer.model into DIR/store
and compares every shard (documents, tokens, sha256) with carry/manifest.json. prism-prep plans
shards from the input bytes and the shard size alone, so the store there must be the store here,
byte for byte; any difference fails the command.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from prism_megatron.launch.demo import write_corpus

VOCAB_SIZE = 32_000
TOKENIZER_SAMPLE_LINES = 1_000_000
SEED = 1234
MAX_FILE_BYTES = 1 << 20
# About 75M tokens, more than a 52.4M-token run reads, and about 36 MiB compressed: with the wheels
# (11 MiB) within what one device call carries. The hf extra's packages, installed here since,
# would more than double an uncapped corpus.
CORPUS_BYTES = 266_000_000
# Fixed: the shard plan, hence the shards' bytes, follows from it.
SHARD_BYTES = 16 << 20
CARRIED = ("tokenizer.model", "corpus.jsonl.xz", "manifest.json")


def python_sources() -> list[Path]:
    """The .py files of the interpreter's library and of this environment's site-packages, first
    copy of each content only, in a fixed order."""
    roots = dict.fromkeys(Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "purelib"))
    seen, sources = set(), []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            # The editable install's finder is the one file here that this project wrote.
            if not path.is_file() or path.name.startswith("__editable__") or path.stat().st_size > MAX_FILE_BYTES:
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).digest()
            if data.strip() and digest not in seen:
                seen.add(digest)
                sources.append(path)
    return sources


def first_sources(limit_bytes: int) -> list[Path]:
    """python_sources() in order until their sizes reach limit_bytes (the file that crosses it
    included)."""
    taken, size = [], 0
    for path in python_sources():
        if size >= limit_bytes:
            break
        taken.append(path)
        size += path.stat().st_size
    return taken


def build(folder: Path) -> None:
    from prism_megatron.data_prep.store import TokenStore
    from prism_megatron.data_prep.tokenize import tokenize_corpus
    from prism_megatron.data_prep.tokenizer import train_tokenizer

    carry = folder / "carry"
    carry.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, store = folder / "corpus.jsonl", carry / "tokenizer.model", folder / "store"
    if not corpus.exists():
        write_corpus(first_sources(CORPUS_BYTES), corpus)
    if not tokenizer.exists():
        train_tokenizer([str(corpus)], str(tokenizer), VOCAB_SIZE, model_type="bpe",
                        sample_lines=TOKENIZER_SAMPLE_LINES, seed=SEED)
    tokenize_corpus([str(corpus)], str(tokenizer), str(store), workers=os.cpu_count() or 1, shard_bytes=SHARD_BYTES)
    shutil.copyfile(store / "manifest.json", carry / "manifest.json")
    packed = carry / "corpus.jsonl.xz"
    if not packed.exists():
        with open(corpus, "rb") as src, lzma.open(str(packed) + ".part", "wb", preset=9) as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(str(packed) + ".part", packed)
    opened = TokenStore.open(str(store))
    print(f"{corpus}: {corpus.stat().st_size / 1e6:.1f} MB, {opened.num_documents:,} documents, "
          f"{opened.num_tokens:,} tokens in {len(opened.shards)} shards")
    print(f"{carry}: " + ", ".join(f"{name} {(carry / name).stat().st_size / 2**20:.1f} MiB" for name in CARRIED))


def rebuild(folder: Path) -> None:
    from prism_megatron.data_prep.tokenize import tokenize_corpus

    carry = folder / "carry"
    missing = [name for name in CARRIED if not (carry / name).exists()]
    if missing:
        sys.exit(f"code_corpus: {carry} lacks {', '.join(missing)}: carry the folder that build wrote")
    corpus, store = folder / "corpus.jsonl", folder / "store"
    if not corpus.exists():
        with lzma.open(carry / "corpus.jsonl.xz", "rb") as src, open(str(corpus) + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(str(corpus) + ".part", corpus)
    tokenize_corpus([str(corpus)], str(carry / "tokenizer.model"), str(store), workers=os.cpu_count() or 1,
                    shard_bytes=SHARD_BYTES)
    expected, got = (json.loads(path.read_text()) for path in (carry / "manifest.json", store / "manifest.json"))
    fields = ("num_documents", "num_tokens", "sha256")
    want = [tuple(s[f] for f in fields) for s in expected["shards"]]
    have = [tuple(s[f] for f in fields) for s in got["shards"]]
    if have != want or got["tokenizer"]["sha256"] != expected["tokenizer"]["sha256"]:
        differing = [i for i in range(max(len(want), len(have))) if want[i:i + 1] != have[i:i + 1]]
        sys.exit(f"code_corpus: {store} differs from the store built with {carry}: shards {differing} "
                 f"(documents, tokens, sha256) here {[have[i] for i in differing if i < len(have)]}, "
                 f"there {[want[i] for i in differing if i < len(want)]}")
    print(f"{store}: {sum(s[1] for s in have):,} tokens in {len(have)} shards, identical to {carry / 'manifest.json'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "rebuild"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    (build if args.command == "build" else rebuild)(args.folder)


if __name__ == "__main__":
    main()
