"""The corpus of the quality runs (docs/QUALITY.md): Python sources that no one here wrote, as a
32,000-piece tokenizer and a token store, built here and rebuilt on the GPU machine from what travels
there (64 MiB a call, wheels included).

    python benchmarks/code_corpus.py build runs/code-corpus      # here: corpus, tokenizer, store, carry/
    python benchmarks/code_corpus.py rebuild runs/code-corpus    # there, with runs/code-corpus/carry carried

build: installs the packages pinned in benchmarks/code-corpus-packages.txt into DIR/packages (pip,
no dependencies, sdists built against this environment's torch), then takes the .py files of the
interpreter's standard library and of DIR/packages, one JSON line {"text", "path"} per file in path
order, leaving out files seen before (same bytes) and files over 1 MB (generated tables, not code),
up to CORPUS_BYTES; trains a BPE tokenizer on 1M lines sampled from it; writes the token store; and
fails unless the store holds the documents and tokens of benchmarks/code-corpus.json (what the
quality runs trained on), so that runs made in different sessions read the same batches. DIR/carry/
gets the tokenizer, the corpus xz-compressed and the store's manifest.
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
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from prism_megatron.launch.demo import write_corpus

VOCAB_SIZE = 32_000
TOKENIZER_SAMPLE_LINES = 1_000_000
SEED = 1234
MAX_FILE_BYTES = 1 << 20
# About 75M tokens, more than a 52.4M-token run reads, and about 36 MiB compressed: with the wheels
# (11 MiB) within what one device call carries. The hf extra's packages, installed here since,
# would more than double an uncapped corpus.
CORPUS_BYTES = 266_000_000
PACKAGES = Path(__file__).with_name("code-corpus-packages.txt")
# What the quality runs read from the store (content_digest): a build must give the same.
CONTENT = Path(__file__).with_name("code-corpus.json")
# Fixed: the shard plan, hence the shards' bytes, follows from it.
SHARD_BYTES = 16 << 20
CARRIED = ("tokenizer.model", "corpus.jsonl.xz", "manifest.json")


def python_sources(packages: Path) -> list[Path]:
    """The .py files of the interpreter's standard library, then of the folder packages, first copy
    of each content only, in a fixed order."""
    roots = dict.fromkeys(path.resolve() for path in (Path(sysconfig.get_paths()["stdlib"]), packages))
    seen, sources = set(), []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            # An editable install's finder is the one file in an environment's site-packages that the
            # installed project wrote.
            if not path.is_file() or path.name.startswith("__editable__") or path.stat().st_size > MAX_FILE_BYTES:
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).digest()
            if data.strip() and digest not in seen:
                seen.add(digest)
                sources.append(path)
    return sources


def first_sources(limit_bytes: int, packages: Path) -> list[Path]:
    """python_sources(packages) in order until their sizes reach limit_bytes (the file that crosses
    it included)."""
    taken, size = [], 0
    for path in python_sources(packages):
        if size >= limit_bytes:
            break
        taken.append(path)
        size += path.stat().st_size
    return taken


def install_packages(folder: Path) -> Path:
    """PACKAGES installed into folder/packages (once; a finished install is kept)."""
    packages, done = folder / "packages", folder / "packages.installed"
    if not done.exists():
        shutil.rmtree(packages, ignore_errors=True)
        # No build isolation: an sdist that records the torch it was built against (deepspeed) must see
        # this environment's, as the project's own install does.
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                    "--no-build-isolation", "--no-compile", "--target", str(packages), "-r",
                                    str(PACKAGES)])
        if installed.returncode:
            sys.exit(f"code_corpus: pip could not install {PACKAGES} into {packages} (its message is above)")
        done.touch()
    return packages


def differing_shards(store_manifest: Path, reference: Path) -> str | None:
    """None if the store of store_manifest has reference's tokenizer and shards (documents, tokens,
    sha256), else what differs."""
    expected, got = (json.loads(path.read_text()) for path in (reference, store_manifest))
    fields = ("num_documents", "num_tokens", "sha256")
    want = [tuple(s[f] for f in fields) for s in expected["shards"]]
    have = [tuple(s[f] for f in fields) for s in got["shards"]]
    if got["tokenizer"]["sha256"] != expected["tokenizer"]["sha256"]:
        return f"the tokenizer (sha256 {got['tokenizer']['sha256']}, {reference} has {expected['tokenizer']['sha256']})"
    if have != want:
        differing = [i for i in range(max(len(want), len(have))) if want[i:i + 1] != have[i:i + 1]]
        return (f"shards {differing} (documents, tokens, sha256): "
                f"here {[have[i] for i in differing if i < len(have)]}, "
                f"in {reference} {[want[i] for i in differing if i < len(want)]}")
    return None


def content_digest(store_dir: Path) -> dict:
    """What a run reads from the store, whatever its shard boundaries (which follow the corpus file's
    bytes, paths included): the tokenizer, and one sha256 over the documents' lengths, then their
    tokens, in order."""
    from prism_megatron.data_prep.loader import document_lengths
    from prism_megatron.data_prep.store import TokenStore

    store = TokenStore.open(str(store_dir))
    digest = hashlib.sha256()
    digest.update(document_lengths(store).astype("<i8").tobytes())
    little_endian = np.dtype(store.token_dtype).newbyteorder("<")
    for i, shard in enumerate(store.shards):
        digest.update(store.read_tokens(i, 0, shard.num_tokens).astype(little_endian).tobytes())
    return {"documents": store.num_documents, "tokens": store.num_tokens,
            "tokenizer_sha256": store.manifest["tokenizer"]["sha256"], "content_sha256": digest.hexdigest()}


def build(folder: Path) -> None:
    from prism_megatron.data_prep.store import TokenStore
    from prism_megatron.data_prep.tokenize import tokenize_corpus
    from prism_megatron.data_prep.tokenizer import train_tokenizer

    carry = folder / "carry"
    carry.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, store = folder / "corpus.jsonl", carry / "tokenizer.model", folder / "store"
    if not corpus.exists():
        write_corpus(first_sources(CORPUS_BYTES, install_packages(folder)), corpus)
    if not tokenizer.exists():
        train_tokenizer([str(corpus)], str(tokenizer), VOCAB_SIZE, model_type="bpe",
                        sample_lines=TOKENIZER_SAMPLE_LINES, seed=SEED)
    tokenize_corpus([str(corpus)], str(tokenizer), str(store), workers=os.cpu_count() or 1, shard_bytes=SHARD_BYTES)
    built, expected = content_digest(store), json.loads(CONTENT.read_text())
    if built != expected:
        sys.exit(f"code_corpus: {store} does not hold the quality runs' tokens: {built}, {CONTENT} has {expected}. "
                 f"The corpus follows {PACKAGES} and this interpreter's standard library, the tokenizer "
                 f"the installed sentencepiece")
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
    difference = differing_shards(store / "manifest.json", carry / "manifest.json")
    if difference:
        sys.exit(f"code_corpus: {store} differs from the store built with {carry}: {difference}")
    built = json.loads((store / "manifest.json").read_text())
    print(f"{store}: {built['num_tokens']:,} tokens in {len(built['shards'])} shards, "
          f"identical to {carry / 'manifest.json'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "rebuild"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    (build if args.command == "build" else rebuild)(args.folder)


if __name__ == "__main__":
    main()
