"""`prism-prep tokenizer | tokenize | merge | inspect`, run as a user runs them (subprocesses)."""

import gzip
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_megatron.data_prep.store import TokenStore
from prism_megatron.data_prep.tokenizer import Tokenizer, reservoir_sample

PREP = str(Path(sys.executable).with_name("prism-prep"))


def prep(*args, check=True):
    result = subprocess.run([PREP, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"prism-prep {args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stdlib_documents(limit_bytes):
    """Python's own sources: real, varied text that every machine with Python has."""
    documents, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            documents.append(text)
            total += len(text)
        if total >= limit_bytes:
            break
    return documents


def write_jsonl(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}) + "\n")


def stored_documents(store_path):
    store = TokenStore.open(store_path)
    for i in range(len(store.shards)):
        tokens, offsets = store.open_shard(i)
        tokens, offsets = tokens[:], offsets[:]
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield tokens[start:end]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    write_jsonl(root / "train.jsonl", stdlib_documents(1 << 20))
    model = root / "tok.model"
    out = prep("tokenizer", root / "train.jsonl", "--output", model, "--vocab-size", 400,
               "--sample-lines", 5000, "--special-tokens", "<|sep|>").stdout
    assert "vocab_size=400 eos_id=3 bos_id=2 pad_id=0" in out
    return str(model)


def test_reservoir_sample_is_seeded_and_uniform():
    assert reservoir_sample(map(str, range(5)), 10, seed=1) == list(map(str, range(5)))
    assert reservoir_sample(range(1000), 10, seed=3) == reservoir_sample(range(1000), 10, seed=3)
    counts = np.zeros(100)
    for seed in range(2000):
        sample = reservoir_sample(range(100), 10, seed)
        assert len(set(sample)) == 10
        counts[sample] += 1
    # Each item is kept with probability 0.1: 200 of 2000 draws, binomial sd ~13.4.
    assert np.abs(counts - 200).max() < 70


def test_tokenizer_is_lossless_with_special_tokens_and_adoptable(tokenizer, tmp_path):
    tok = Tokenizer(tokenizer)
    text = "def f(x):\n    return x  # two  spaces\n\ncafé ✓"
    assert tok.decode(tok.encode_arrays([text])[0]) == text
    sep = tok.encode_arrays(["<|sep|>"])[0]
    assert len([i for i in sep if tok.decode([i]) == "<|sep|>"]) == 1

    adopted = tmp_path / "adopted.model"
    out = prep("tokenizer", "--adopt", tokenizer, "--output", adopted).stdout
    assert tok.sha256 in out and Tokenizer(adopted).identity()["sha256"] == tok.sha256

    (tmp_path / "junk.model").write_bytes(b"not a model")
    bad = prep("tokenizer", "--adopt", tmp_path / "junk.model", "--output", tmp_path / "x.model",
               check=False)
    assert bad.returncode == 1 and "junk.model" in bad.stderr


def test_unigram_training_from_txt_is_reproducible(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(stdlib_documents(300_000)))
    models = []
    for name in ("u1.model", "u2.model"):
        out = prep("tokenizer", tmp_path / "a.txt", "--output", tmp_path / name, "--vocab-size", 300,
                   "--model-type", "unigram", "--sample-lines", 3000, "--no-byte-fallback").stdout
        assert "vocab_size=300" in out
        models.append(Tokenizer(tmp_path / name).sha256)
    # Same sample, same settings: the same identity, so stores made with either can be merged.
    assert models[0] == models[1]


def write_bad_corpus(root: Path):
    """Every kind of bad input, with the documents a run must keep from it, in order."""
    root.mkdir()
    lines = [b'{"text": "hello world"}', b"this is not json", b'{"content": "no text key"}',
             b'{"text": ""}', b'{"text": "caf\xe9 latin-1"}', b'{"text": "lone \\ud800 surrogate"}',
             b'{"text": 5}', b"", b"[1, 2]", b'{"text": "last"}']
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    a_docs = ["hello world", "caf\ufffd latin-1", "lone ? surrogate", "last"]

    (root / "b.txt").write_bytes(b"line one\n\nline \xff two\n   \nno newline at the end")
    b_docs = ["line one", "line \ufffd two", "no newline at the end"]

    gz_docs = [f"gzipped document {i} " + "word " * (i % 7) for i in range(20000)]
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in gz_docs).encode())
    (root / "c.jsonl.gz").write_bytes(data[: len(data) // 2])

    pq.write_table(pa.table({"text": ["row one", None, "", "row four", "row five"],
                             "id": [1, 2, 3, 4, 5]}), root / "d.parquet", row_group_size=2)
    d_docs = ["row one", "row four", "row five"]
    pq.write_table(pa.table({"body": ["x", "y"]}), root / "e.parquet")
    (root / "f.parquet").write_bytes(b"PAR1 this is not parquet")
    return {"a": a_docs, "b": b_docs, "c": gz_docs, "d": d_docs}


def test_tokenize_reads_every_format_and_counts_bad_input(tokenizer, tmp_path):
    expected = write_bad_corpus(tmp_path / "in")
    store = tmp_path / "store"
    run = prep("tokenize", tmp_path / "in" / "a.jsonl", tmp_path / "in" / "*.txt",
               tmp_path / "in", "--tokenizer", tokenizer, "--output", store, "--workers", 2,
               "--shard-size-mb", 0.01)
    report = json.loads((store / "report.json").read_text())["files"]
    by_name = {Path(p).name: counts for p, counts in report.items()}
    assert list(by_name) == ["a.jsonl", "b.txt", "c.jsonl.gz", "d.parquet", "e.parquet",
                             "f.parquet"]
    a, b, c, d, e, f = by_name.values()
    assert (a["documents"], a["invalid_json"], a["missing_text"], a["non_utf8"], a["empty"]) \
        == (4, 1, 3, 2, 2)
    assert (b["documents"], b["non_utf8"], b["empty"]) == (3, 1, 2)
    assert c["truncated"] == 1 and "EOFError" in c["error"] and 0 < c["documents"] < 20000
    assert (d["documents"], d["missing_text"], d["empty"]) == (3, 1, 1)
    assert (e["documents"], e["missing_text"]) == (0, 2)
    assert f["truncated"] == 1 and f["documents"] == 0
    for name in ("a.jsonl: invalid_json=1", "c.jsonl.gz:", "f.parquet: truncated=1"):
        assert name in run.stdout
    assert "bad input: invalid_json=1, missing_text=6" in prep("inspect", store).stdout

    tok = Tokenizer(tokenizer)
    decoded = [tok.decode(ids) for ids in stored_documents(store)]
    keep = expected["a"] + expected["b"] + expected["c"][: c["documents"]] + expected["d"]
    assert decoded == keep

    opened = TokenStore.open(store)
    assert len(opened.shards) > 1 and opened.num_documents == len(keep)
    tokens, offsets = opened.open_shard(0)
    assert tokens.dtype == np.uint16 and offsets.dtype == np.uint64


def big_corpus(root: Path, documents=1200):
    root.mkdir()
    texts = stdlib_documents(6 << 20)[:documents]
    for i in range(4):
        write_jsonl(root / f"part{i}.jsonl", texts[i::4])
    return len(texts)


def manifest_shards(store):
    return [(s["num_documents"], s["num_tokens"], s["sha256"])
            for s in json.loads((store / "manifest.json").read_text())["shards"]]


def start_and_wait_for_shards(args, store, shards):
    """Start `prism-prep tokenize` and return it once it has recorded ``shards`` shards."""
    done = store / ".prep" / "done"
    proc = subprocess.Popen([PREP, "tokenize", *map(str, args), "--output", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(list(done.glob("*.json")) if done.exists() else []) < shards and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    return proc


def test_kill_and_resume_matches_an_uninterrupted_run(tokenizer, tmp_path):
    documents = big_corpus(tmp_path / "in")
    args = [tmp_path / "in", "--tokenizer", tokenizer, "--workers", 2, "--shard-size-mb", 0.1]
    prep("tokenize", *args, "--output", tmp_path / "whole")
    assert TokenStore.open(tmp_path / "whole").num_documents == documents
    store = tmp_path / "killed"

    # A worker killed (as by the OOM killer): the run stops with an error instead of hanging.
    proc = start_and_wait_for_shards(args, store, 1)
    workers = [p for p in psutil.Process(proc.pid).children()
               if "spawn_main" in " ".join(p.cmdline())]
    workers[0].kill()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "worker process died" in stderr, stderr

    # The whole command killed (kill -9): its workers die with it.
    recorded = len(list((store / ".prep" / "done").glob("*.json")))
    proc = start_and_wait_for_shards(args, store, recorded + 2)
    children = psutil.Process(proc.pid).children()
    proc.kill()
    proc.communicate()
    assert not (store / "manifest.json").exists()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, "workers outlived their killed parent"

    rerun = prep("tokenize", *args, "--output", store)
    assert "resuming" in rerun.stderr
    assert manifest_shards(store) == manifest_shards(tmp_path / "whole")
    assert (json.loads((store / "report.json").read_text())
            == json.loads((tmp_path / "whole" / "report.json").read_text()))
    assert prep("inspect", store).returncode == 0

    # A rerun of a finished store changes nothing; a rerun with other inputs is refused.
    prep("tokenize", *args, "--output", store)
    assert manifest_shards(store) == manifest_shards(tmp_path / "whole")
    with open(tmp_path / "in" / "part0.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    refused = prep("tokenize", *args, "--output", store, check=False)
    assert refused.returncode == 1 and "different inputs" in refused.stderr


def test_split_across_machines_then_merge(tokenizer, tmp_path):
    big_corpus(tmp_path / "in", documents=300)
    args = [tmp_path / "in", "--tokenizer", tokenizer, "--workers", 1, "--shard-size-mb", 0.1]
    prep("tokenize", *args, "--output", tmp_path / "whole")
    for part in range(2):
        prep("tokenize", *args, "--num-shards", 2, "--shard-index", part,
             "--output", tmp_path / f"part{part}")
    out = prep("merge", tmp_path / "merged", tmp_path / "part0", tmp_path / "part1").stdout
    assert manifest_shards(tmp_path / "merged") == manifest_shards(tmp_path / "whole")
    merged = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert merged["shards"][0]["path"].startswith("../part0/shards/")
    assert f"{merged['num_documents']:,} documents" in out
    assert (json.loads((tmp_path / "merged" / "report.json").read_text())["totals"]
            == json.loads((tmp_path / "whole" / "report.json").read_text())["totals"])

    shown = prep("inspect", tmp_path / "merged", "--sample", 1).stdout
    first = json.loads((tmp_path / "in" / "part0.jsonl").open().readline())["text"]
    assert first[:40] in shown and "checksums OK" in shown

    # A store made with another tokenizer (same shards, another model's identity).
    shutil.copytree(tmp_path / "part1", tmp_path / "other")
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(manifest))
    refused = prep("merge", tmp_path / "bad", tmp_path / "part0", tmp_path / "other", check=False)
    assert refused.returncode == 1 and "different tokenizers" in refused.stderr
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_inspect_names_a_corrupt_shard(tokenizer, tmp_path):
    big_corpus(tmp_path / "in", documents=40)
    store = tmp_path / "store"
    prep("tokenize", tmp_path / "in", "--tokenizer", tokenizer, "--output", store,
         "--shard-size-mb", 0.25, "--workers", 1)
    shard = sorted((store / "shards").glob("*.zarr"))[1]
    chunk = max((p for p in (shard / "tokens").rglob("*") if p.is_file() and p.name != "zarr.json"),
                key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF  # the first token (the shard index sits at the end)
    chunk.write_bytes(bytes(data))
    result = prep("inspect", store, check=False)
    assert result.returncode == 1
    corrupt = [line for line in result.stdout.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 1 and str(shard) in corrupt[0]


def test_bad_arguments_give_clear_errors(tokenizer, tmp_path):
    missing = prep("tokenize", tmp_path / "nothing-*.jsonl", "--tokenizer", tokenizer,
                   "--output", tmp_path / "s", check=False)
    assert missing.returncode == 1 and "nothing-*.jsonl" in missing.stderr
    (tmp_path / "notes.csv").write_text("a,b\n")
    unsupported = prep("tokenize", tmp_path / "notes.csv", "--tokenizer", tokenizer,
                       "--output", tmp_path / "s", check=False)
    assert unsupported.returncode == 1 and "notes.csv" in unsupported.stderr
    no_store = prep("inspect", tmp_path / "s2", check=False)
    assert no_store.returncode == 1 and "manifest" in no_store.stderr


def refused(result, *names):
    """A one-line error naming ``names``, exit code 1, no traceback."""
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(str(name) in result.stderr for name in names), result.stderr


def test_options_out_of_range_are_refused(tokenizer, tmp_path):
    (tmp_path / "in.txt").write_text("one document\n")
    (tmp_path / "a-file").write_text("not a store")
    args = [tmp_path / "in.txt", "--tokenizer", tokenizer]
    for option, value in [("--shard-size-mb", -1), ("--shard-size-mb", 0), ("--shard-size-mb", "nan"),
                          ("--workers", 0), ("--num-shards", 0)]:
        result = prep("tokenize", *args, "--output", tmp_path / "s", option, value, check=False)
        refused(result, option, value)
    refused(prep("tokenize", *args, "--output", tmp_path / "a-file", check=False), "a-file")
    refused(prep("merge", tmp_path / "a-file", tmp_path / "s", check=False), "a-file")
    refused(prep("inspect", tmp_path / "s", "--sample", -1, check=False), "--sample")
    assert not (tmp_path / "s").exists()
