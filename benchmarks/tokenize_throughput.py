"""Tokenization throughput and memory: `prism-prep tokenize --workers N` vs bare sentencepiece.

Builds a jsonl corpus of at least ``--gb`` GB from text files on this machine (Python sources,
docs, headers) and trains (or reuses) a sentencepiece model on it. Then, on each of ``--rounds``
parts of the corpus in turn (ABBA order):
  - baseline: N processes, each reading its share of the files and calling sentencepiece's
    batch ``encode`` (numpy output, one thread), writing nothing;
  - ``prism-prep tokenize`` with N workers on the same files, timed from launch to exit, with its
    peak resident memory summed over the parent and its workers;
and finally ``prism-prep tokenize`` on the whole corpus, whose peak memory against a part's
shows whether memory grows with corpus size.
The ratio is baseline time / tokenize time, against the baseline's time inside ``encode`` alone
(strict) and against its read + parse + encode time, in wall-clock seconds and in CPU seconds.
On a shared machine wall time depends on what else runs, CPU seconds (summed over every process
of a run, prism-prep's start-up, planning and writing included) less so; the turns on each part
make both sides meet the same neighbours.

    .venv/bin/python benchmarks/tokenize_throughput.py [--gb 1.0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import psutil
import sentencepiece as spm

PREP = str(Path(sys.executable).with_name("prism-prep"))
SOURCE_SUFFIXES = (".py", ".txt", ".rst", ".md", ".h", ".c", ".cpp", ".cu", ".cuh")
FILE_BYTES = 64 << 20
BATCH_BYTES = 4 << 20


def source_texts() -> list[str]:
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], "/usr/share/doc"]
    paths = sorted(p for root in roots for p in Path(root).rglob("*")
                   if p.suffix in SOURCE_SUFFIXES and p.is_file()
                   and 1 << 10 <= p.stat().st_size <= 2 << 20)
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def build_corpus(folder: Path, target_bytes: int) -> list[str]:
    """jsonl files of FILE_BYTES each, cycling over the machine's text files until target_bytes."""
    marker = folder / "complete.json"
    if marker.exists() and json.loads(marker.read_text())["target_bytes"] == target_bytes:
        return json.loads(marker.read_text())["files"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    texts = source_texts()
    print(f"building a {target_bytes / 1e9:.2f} GB corpus from {len(texts)} files",
          file=sys.stderr)
    files, written, i = [], 0, 0
    while written < target_bytes:
        path = folder / f"part-{len(files):04d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < FILE_BYTES and written + f.tell() < target_bytes:
                f.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")
                i += 1
            written += f.tell()
        files.append(str(path))
    marker.write_text(json.dumps({"target_bytes": target_bytes, "files": files}))
    return files


def tokenizer_for(corpus: list[str], model: Path, vocab_size: int) -> str:
    if not model.exists():
        subprocess.run([PREP, "tokenizer", corpus[0], "--output", str(model), "--vocab-size",
                        str(vocab_size), "--sample-lines", "300000"], check=True)
    return str(model)


def _encode_share(model: str, files: list[str], results) -> None:
    processor = spm.SentencePieceProcessor(model_file=model)
    start, start_cpu = time.perf_counter(), time.process_time()
    encoding, encoding_cpu, tokens, batch, size = 0.0, 0.0, 0, [], 0

    def encode() -> None:
        nonlocal encoding, encoding_cpu, tokens, batch, size
        t, t_cpu = time.perf_counter(), time.process_time()
        ids = processor.encode(batch, out_type="numpy", num_threads=1)
        encoding += time.perf_counter() - t
        encoding_cpu += time.process_time() - t_cpu
        tokens += sum(len(x) for x in ids)
        batch, size = [], 0

    for path in files:
        with open(path, "rb") as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                size += len(batch[-1])
                if size >= BATCH_BYTES:
                    encode()
    if batch:
        encode()
    results.put((encoding, time.perf_counter() - start, encoding_cpu,
                 time.process_time() - start_cpu, tokens))


def bare_encode(model: str, files: list[str], processes: int) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = time.perf_counter()
    workers = [context.Process(target=_encode_share, args=(model, files[i::processes], results))
               for i in range(processes)]
    for w in workers:
        w.start()
    shares = [results.get() for _ in workers]
    for w in workers:
        w.join()
    return {"encode_s": max(s[0] for s in shares), "read_encode_s": max(s[1] for s in shares),
            "encode_cpu_s": sum(s[2] for s in shares),
            "read_encode_cpu_s": sum(s[3] for s in shares),
            "wall_s": time.perf_counter() - start, "tokens": sum(s[4] for s in shares)}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def prep_tokenize(model: str, files: list[str], store: Path, workers: int) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    start, start_cpu = time.perf_counter(), _children_cpu_s()
    proc = subprocess.Popen([PREP, "tokenize", *files, "--tokenizer", model, "--output",
                             str(store), "--workers", str(workers)],
                            stdout=subprocess.DEVNULL)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    cpu = _children_cpu_s() - start_cpu  # prism-prep and its workers, all waited for
    if proc.returncode:
        raise SystemExit(f"prism-prep tokenize failed with exit code {proc.returncode}")
    manifest = json.loads((store / "manifest.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": peak / 1e9, "tokens": manifest["num_tokens"],
            "documents": manifest["num_documents"], "shards": len(manifest["shards"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/prism_tokenize_bench")
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=4,
                        help="corpus parts, each timed bare then prism-prep (or the reverse)")
    args = parser.parse_args()

    work = Path(args.work)
    files = build_corpus(work / "corpus", int(args.gb * 1e9))
    model = tokenizer_for(files, work / f"tok{args.vocab_size}.model", args.vocab_size)
    parts = [files[len(files) * r // args.rounds:len(files) * (r + 1) // args.rounds]
             for r in range(args.rounds)]

    # Bare and prism-prep take turns on each part, in ABBA order, so that whatever else runs
    # on a shared machine slows both alike.
    bare, prep, part_peak = Counter(), Counter(), 0.0
    for r, part in enumerate(parts):
        for what in (("bare", "prep") if r % 2 == 0 else ("prep", "bare")):
            if what == "bare":
                b = bare_encode(model, part, args.workers)
                bare.update(b)
            else:
                p = prep_tokenize(model, part, work / "store_part", args.workers)
                part_peak = max(part_peak, p.pop("peak_rss_gb"))
                prep.update(p)
            print(f"part {r}: {what} {json.dumps(b if what == 'bare' else p)}", file=sys.stderr)
    whole = prep_tokenize(model, files, work / "store", args.workers)
    if not bare["tokens"] == prep["tokens"] == whole["tokens"]:
        raise SystemExit(f"token counts differ: bare {bare['tokens']}, prism-prep "
                         f"{prep['tokens']} in parts, {whole['tokens']} whole")

    corpus_bytes = sum(os.path.getsize(f) for f in files)
    result = {
        "corpus_gb": corpus_bytes / 1e9, "files": len(files), "rounds": args.rounds,
        "workers": args.workers, "vocab_size": args.vocab_size, "tokens": whole["tokens"],
        "documents": whole["documents"],
        "bare_encode_s": bare["encode_s"], "bare_read_encode_s": bare["read_encode_s"],
        "bare_encode_cpu_s": bare["encode_cpu_s"],
        "bare_read_encode_cpu_s": bare["read_encode_cpu_s"],
        "prep_wall_s": prep["wall_s"], "prep_cpu_s": prep["cpu_s"],
        "wall_ratio_vs_encode_only": bare["encode_s"] / prep["wall_s"],
        "wall_ratio_vs_read_encode": bare["read_encode_s"] / prep["wall_s"],
        "cpu_ratio_vs_encode_only": bare["encode_cpu_s"] / prep["cpu_s"],
        "cpu_ratio_vs_read_encode": bare["read_encode_cpu_s"] / prep["cpu_s"],
        "prep_mb_per_s": corpus_bytes / 1e6 / prep["wall_s"],
        "peak_rss_gb_part": part_peak, "part_gb": corpus_bytes / args.rounds / 1e9,
        "peak_rss_gb_whole": whole["peak_rss_gb"], "whole_wall_s": whole["wall_s"],
        "whole_cpu_s": whole["cpu_s"], "load_average_1m_at_end": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))
    (work / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
