"""`prism-prep`: train or adopt a tokenizer, tokenize a corpus into a token store, merge stores,
inspect a store."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from prism_megatron.data_prep import sources, tokenize
from prism_megatron.data_prep.store import TokenStore, TokenStoreError, merge_stores
from prism_megatron.data_prep.tokenizer import (Tokenizer, TokenizerError, adopt_tokenizer,
                                                same_tokenizer, train_tokenizer)
from prism_megatron.files import DiskError, disk_errors_named


SAMPLE_TOKENS = 200
MIN_SHARD_SIZE_MB = 0.001  # a shard of a few bytes per file is a mistake that fills a disk


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise sources.InputError(message)


def _output_directory(path: str) -> None:
    _require(not os.path.exists(path) or os.path.isdir(path),
             f"output {path} is a file; it must name a store directory")


def _tokenizer(args: argparse.Namespace) -> int:
    if args.adopt:
        if args.inputs:
            raise sources.InputError("give either input files to train on or --adopt MODEL")
        path = adopt_tokenizer(args.adopt, args.output)
    else:
        if not args.inputs or args.vocab_size is None:
            raise sources.InputError("training needs input files and --vocab-size")
        _require(args.vocab_size >= 1, f"--vocab-size must be at least 1 (got {args.vocab_size})")
        _require(args.sample_lines >= 1,
                 f"--sample-lines must be at least 1 (got {args.sample_lines})")
        path = train_tokenizer(args.inputs, args.output, args.vocab_size, args.model_type,
                               args.sample_lines, args.seed, args.special_tokens,
                               args.byte_fallback, args.text_key)
    identity = Tokenizer(path).identity()
    print(f"{path}: vocab_size={identity['vocab_size']} eos_id={identity['eos_id']} "
          f"bos_id={identity['bos_id']} pad_id={identity['pad_id']} sha256={identity['sha256']}")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    _require(args.workers >= 1, f"--workers must be at least 1 (got {args.workers})")
    _require(math.isfinite(args.shard_size_mb) and args.shard_size_mb >= MIN_SHARD_SIZE_MB,
             f"--shard-size-mb must be at least {MIN_SHARD_SIZE_MB} (got {args.shard_size_mb})")
    _require(args.num_shards is None or args.num_shards >= 1,
             f"--num-shards must be at least 1 (got {args.num_shards})")
    _output_directory(args.output)
    tokenize.tokenize_corpus(args.inputs, args.tokenizer, args.output, workers=args.workers,
                             text_key=args.text_key, num_shards=args.num_shards,
                             shard_index=args.shard_index,
                             shard_bytes=int(args.shard_size_mb * 2**20))
    return 0


def _merge(args: argparse.Namespace) -> int:
    _output_directory(args.output)
    path = merge_stores(args.output, args.stores)
    store = TokenStore.open(path)
    print(f"{path}: {len(store.shards)} shards, {store.num_documents:,} documents, "
          f"{store.num_tokens:,} tokens")
    return 0


def _decoded_sample(store: TokenStore, tokenizer_path: str | None, documents: int) -> None:
    path = tokenizer_path or store.manifest["tokenizer"].get("path")
    if not path or not os.path.exists(path):
        print(f"no tokenizer at {path}; pass --tokenizer to see a decoded sample")
        return
    tokenizer = Tokenizer(path)
    if not same_tokenizer(tokenizer.identity(), store.manifest["tokenizer"]):
        print(f"{path} is not the tokenizer this store was made with "
              f"(sha256 {tokenizer.sha256}, store: {store.manifest['tokenizer']['sha256']}); "
              "no decoded sample")
        return
    shown = 0
    for i, shard in enumerate(store.shards):
        if shown == documents:
            break
        tokens, offsets = store.open_shard(i)
        for d in range(min(documents - shown, shard.num_documents)):
            start, end = int(offsets[d]), int(offsets[d + 1])
            ids = tokens[start:min(end, start + SAMPLE_TOKENS)]
            print(f"--- document {d} of {shard.path} ({end - start} tokens; "
                  f"the first {len(ids)} decoded)")
            print(tokenizer.decode(ids))
            shown += 1


def _inspect(args: argparse.Namespace) -> int:
    _require(args.sample >= 0, f"--sample must be at least 0 (got {args.sample})")
    store = TokenStore.open(args.store)
    tok = store.manifest["tokenizer"]
    print(f"{store.manifest_path}: {len(store.shards)} shards, {store.num_documents:,} documents, "
          f"{store.num_tokens:,} tokens ({store.token_dtype})")
    print(f"tokenizer: vocab_size={tok['vocab_size']} eos_id={tok['eos_id']} "
          f"sha256={tok.get('sha256')} path={tok.get('path')}")
    report_path = os.path.join(store.root, sources.REPORT)
    if os.path.exists(report_path):
        with open(report_path) as f:
            problems = sources.FileReport(**json.load(f)["totals"]).problems()
        print("bad input: " + (", ".join(f"{k}={v}" for k, v in problems.items()) or "none")
              + f" (per file in {report_path})")
    if args.sample:
        _decoded_sample(store, args.tokenizer, args.sample)
    corrupt = store.verify()
    for path in corrupt:
        print(f"CORRUPT: {path} does not match its checksum in {store.manifest_path}")
    if corrupt:
        return 1
    print(f"checksums OK ({len(store.shards)} shards)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-prep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("tokenizer", help="train a sentencepiece model, or adopt one")
    p.add_argument("inputs", nargs="*", help="files, directories or globs to sample text from")
    p.add_argument("--output", required=True, help="the .model file to write")
    p.add_argument("--adopt", metavar="MODEL", help="copy this existing .model instead of training")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--sample-lines", type=int, default=1_000_000,
                   help="lines sampled (seeded reservoir) from the inputs to train on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--special-tokens", nargs="*", default=[],
                   help="user-defined pieces that are never split")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl/.parquet")
    p.set_defaults(run=_tokenizer)

    p = commands.add_parser(
        "tokenize", help="tokenize a corpus into a token store (resumable)",
        description="Tokenize a corpus into a token store. Interrupted? Run the same command "
                    "again: finished shards are kept, the rest is redone. Bad input is skipped "
                    "or repaired and counted per file in OUTPUT/report.json.")
    p.add_argument("inputs", nargs="+",
                   help="files, directories or globs of .txt, .jsonl, .jsonl.gz, .parquet")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    p.add_argument("--output", required=True, help="the token store directory")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, each writing whole shards (default: all cores)")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl/.parquet")
    p.add_argument("--num-shards", type=int,
                   help="split the work into this many parts, e.g. one per Slurm array task; "
                        "each part writes its own --output, joined by `prism-prep merge`")
    p.add_argument("--shard-index", type=int,
                   help="the part this run writes, 0-based (e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--shard-size-mb", type=float, default=tokenize.SHARD_BYTES / 2**20,
                   help="input megabytes per store shard (the unit of work and of resume)")
    p.set_defaults(run=_tokenize)

    p = commands.add_parser("merge", help="join stores into one manifest without copying tokens")
    p.add_argument("output", help="the merged store directory")
    p.add_argument("stores", nargs="+", help="stores to join, in order")
    p.set_defaults(run=_merge)

    p = commands.add_parser("inspect", help="counts, a decoded sample, checksum verification")
    p.add_argument("store")
    p.add_argument("--tokenizer", help="the .model (default: the path the manifest recorded)")
    p.add_argument("--sample", type=int, default=2, help="documents to decode (0: none)")
    p.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A full disk (or a quota, a failing device) is one line naming what was being written.
        with disk_errors_named(getattr(args, "output", None) or args.command):
            return args.run(args)
    except (FileNotFoundError, DiskError, TokenStoreError, TokenizerError, ValueError,
            tokenize.WorkerError) as e:
        print(f"prism-prep {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prism-prep {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
