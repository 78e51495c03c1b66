"""benchmarks/code_corpus.py's checks that a store is the quality runs' store: content_digest sees what a
run reads (documents and tokens, in order) and not where the shards were cut, which follows the
corpus file's bytes, paths included; differing_shards compares shard by shard, for a rebuild from the
same corpus file."""
import json
import sys
import sysconfig
from pathlib import Path

import pytest

from prism_megatron.data_prep.tokenize import tokenize_corpus
from prism_megatron.data_prep.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from code_corpus import content_digest, differing_shards  # noqa: E402

SOURCES = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]


def write_corpus(path: Path, folder: str, edit: bool = False) -> Path:
    with open(path, "w") as f:
        for i, source in enumerate(SOURCES):
            text = source.read_text(encoding="utf-8", errors="replace")
            f.write(json.dumps({"text": text + ("# edited\n" if edit and i == 20 else ""),
                                "path": f"{folder}/{source.name}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("code_corpus")
    short = write_corpus(root / "short.jsonl", "/a")
    tokenizer = train_tokenizer([str(short)], str(root / "tok.model"), 512, sample_lines=20_000, seed=0)
    made = {}
    for name, corpus in {"short": short,
                         "long": write_corpus(root / "long.jsonl", "/a" * 2000),
                         "edited": write_corpus(root / "edited.jsonl", "/a", edit=True)}.items():
        made[name] = Path(tokenize_corpus([str(corpus)], tokenizer, str(root / name), shard_bytes=64 << 10))
    return made


def test_content_digest_ignores_where_shards_are_cut(stores):
    # The longer paths move the shard boundaries...
    assert differing_shards(stores["long"] / "manifest.json", stores["short"] / "manifest.json")
    # ...but not the documents or their tokens.
    assert content_digest(stores["long"]) == content_digest(stores["short"])


def test_content_digest_sees_one_changed_document(stores):
    short, edited = content_digest(stores["short"]), content_digest(stores["edited"])
    assert edited["documents"] == short["documents"] and edited["content_sha256"] != short["content_sha256"]


def test_differing_shards_names_what_differs(stores):
    assert differing_shards(stores["short"] / "manifest.json", stores["short"] / "manifest.json") is None
    message = differing_shards(stores["edited"] / "manifest.json", stores["short"] / "manifest.json")
    assert message.startswith("shards [") and str(stores["short"] / "manifest.json") in message
