"""`prism-demo` (what `make demo` runs): the whole pipeline on files every Python install has.

    prism-demo [--workdir runs/demo] [--fresh] [--set training.train_steps=100 ...]

1. corpus: every `.py` file of the standard library (pydoc_data/topics.py, the help texts,
   among them), one JSON line per file;
2. a small BPE tokenizer trained on a sample of its lines, and the token store;
3. a PRISM model of a few million parameters trained with launch/configs/demo.yaml.

Steps 1-2 are cached under WORKDIR/data/<key>, the key a hash of the input files and the
settings, so a rerun goes straight to training; --fresh rebuilds them. Each run trains from
scratch into WORKDIR/train (the previous run's checkpoints and logs there are replaced).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from importlib import resources
from pathlib import Path

from prism_megatron.files import write_atomic
from prism_megatron.launch.config import ConfigError, load_config

VOCAB_SIZE = 2048
TOKENIZER_SAMPLE_LINES = 200_000
SEED = 1234
# What the trained model is asked to continue at the end.
DEMO_PROMPT = "def "
DEMO_NEW_TOKENS = 64
# Several shards, so that both tokenize workers have work.
SHARD_BYTES = 8 << 20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prism-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and logs go")
    parser.add_argument("--fresh", action="store_true", help="rebuild the corpus, tokenizer and store")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of launch/configs/demo.yaml (repeatable)")
    args = parser.parse_args(argv)
    try:
        run_demo(Path(args.workdir), args.fresh, args.set)
    except ConfigError as e:
        sys.exit(f"prism-demo: error: {e}")


def run_demo(workdir: Path, fresh: bool, overrides: list[str]) -> None:
    started = time.perf_counter()
    sources = stdlib_sources()
    data_dir = workdir / "data" / corpus_key(sources)
    if fresh and (workdir / "data").exists():
        say(f"--fresh: removing {workdir / 'data'}")
        shutil.rmtree(workdir / "data")
    store, vocab_size = build_data(sources, data_dir)
    data_seconds = time.perf_counter() - started

    # Imported late: it pulls in torch, DeepSpeed and megatron-core, seconds the data steps skip.
    from prism_megatron.launch.generate import main as generate_main
    from prism_megatron.launch.train import train

    config_path = resources.files("prism_megatron.launch") / "configs" / "demo.yaml"
    train_dir = workdir / "train"
    cfg = load_config(config_path, [f"model.vocab_size={vocab_size}", f"data.stores=[{json.dumps(str(store))}]",
                                    f"checkpoint.dir={json.dumps(str(train_dir / 'checkpoints'))}",
                                    f"logging.tensorboard_dir={json.dumps(str(train_dir / 'tensorboard'))}",
                                    *overrides])
    if train_dir.exists():
        say(f"removing the previous demo run in {train_dir}")
        shutil.rmtree(train_dir)

    say(f"training: {cfg.training.train_steps} steps (config {config_path})")
    train_started = time.perf_counter()
    summary = train(cfg, progress=say)
    train_seconds = time.perf_counter() - train_started

    first_val, last_val = summary.val_losses[min(summary.val_losses)], summary.val_losses[max(summary.val_losses)]
    first_train, last_train = summary.train_losses[min(summary.train_losses)], summary.train_losses[max(summary.train_losses)]
    tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
    total = time.perf_counter() - started
    say("")
    say("PRISM demo: summary")
    say(f"  model        {summary.num_parameters / 1e6:.2f}M parameters, {cfg.training.train_steps} steps of "
        f"{tokens_per_step:,} tokens")
    say(f"  train loss   {first_train:.4f} (step {min(summary.train_losses)}) -> {last_train:.4f} "
        f"(step {max(summary.train_losses)})")
    say(f"  val loss     {first_val:.4f} (step {min(summary.val_losses)}) -> {last_val:.4f} "
        f"(step {max(summary.val_losses)}): {100 * (first_val - last_val) / first_val:.1f}% lower")
    say(f"  throughput   {summary.tokens_per_sec:,.0f} tokens/s")
    say(f"  checkpoint   {summary.checkpoint}")
    say(f"  TensorBoard  {summary.tensorboard_dir}   (tensorboard --logdir {summary.tensorboard_dir})")
    say(f"  time         {total:.0f} s (data {data_seconds:.0f} s, training {train_seconds:.0f} s)")

    say("")
    say(f"What it writes (prism-generate {summary.checkpoint} --prompt {DEMO_PROMPT!r} "
        f"--max-new-tokens {DEMO_NEW_TOKENS} --temperature 0.7):")
    generate_main([str(summary.checkpoint), "--prompt", DEMO_PROMPT, "--max-new-tokens", str(DEMO_NEW_TOKENS),
                   "--temperature", "0.7"])


def stdlib_sources() -> list[Path]:
    """The standard library's .py files (third-party packages excluded), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def corpus_key(sources: list[Path]) -> str:
    """Changes when an input file or a data setting changes, so a stale cache is never reused."""
    digest = hashlib.sha256(json.dumps([VOCAB_SIZE, TOKENIZER_SAMPLE_LINES, SEED, SHARD_BYTES]).encode())
    for p in sources:
        st = p.stat()
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def build_data(sources: list[Path], data_dir: Path) -> tuple[Path, int]:
    """Corpus, tokenizer and store under data_dir, each built once; returns (store, vocab size)."""
    from prism_megatron.data_prep.store import TokenStore
    from prism_megatron.data_prep.tokenize import tokenize_corpus
    from prism_megatron.data_prep.tokenizer import train_tokenizer

    data_dir.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, store = data_dir / "corpus.jsonl", data_dir / "tokenizer.model", data_dir / "store"
    if corpus.exists():
        say(f"corpus: {corpus} (cached)")
    else:
        write_corpus(sources, corpus)
    if tokenizer.exists():
        say(f"tokenizer: {tokenizer} (cached)")
    else:
        say(f"tokenizer: training a {VOCAB_SIZE}-piece BPE model on {TOKENIZER_SAMPLE_LINES:,} sampled lines")
        train_tokenizer([str(corpus)], str(tokenizer), VOCAB_SIZE, model_type="bpe",
                        sample_lines=TOKENIZER_SAMPLE_LINES, seed=SEED)
    if (store / "manifest.json").exists():
        say(f"token store: {store} (cached)")
    else:
        say(f"token store: tokenizing into {store}")
        tokenize_corpus([str(corpus)], str(tokenizer), str(store), workers=os.cpu_count() or 1,
                        shard_bytes=SHARD_BYTES)
    opened = TokenStore.open(str(store))
    say(f"token store: {opened.num_documents:,} documents, {opened.num_tokens:,} tokens")
    return store, opened.vocab_size


def write_corpus(sources: list[Path], corpus: Path) -> None:
    """One JSON line {"text", "path"} per source file, written whole or not at all."""
    lines, repaired = [], 0
    for p in sources:
        data = p.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # a few test files are Latin-1 on purpose
            text, repaired = data.decode("utf-8", errors="replace"), repaired + 1
        lines.append(json.dumps({"text": text, "path": str(p)}) + "\n")
    write_atomic(corpus, "".join(lines))
    say(f"corpus: {len(sources):,} files, {corpus.stat().st_size / 1e6:.1f} MB -> {corpus}"
        + (f" ({repaired} not UTF-8, undecodable bytes replaced)" if repaired else ""))


def say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    main()
