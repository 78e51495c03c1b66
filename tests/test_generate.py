"""`prism-generate` as a user runs it, on an exported folder (weights, config, tokenizer), and the sampling
and generation loop of prism_megatron/decoding.py it uses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism_megatron.config import ModelConfig, ParallelConfig

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, head_v_dim=8,
              ffn_hidden_size=48, solver="prism", solver_steps=3)

pytestmark = pytest.mark.usefixtures("single_process")


def write_exported(folder: Path, config: dict) -> Path:
    """An export folder as `prism-ckpt export` writes it, of a freshly initialised model of `config`
    (vocab_size VOCAB), with a tokenizer trained on code."""
    from prism_megatron.data_prep.tokenizer import train_tokenizer
    from prism_megatron.launch.checkpoint.export import write_export
    from prism_megatron.model import PrismLM
    from prism_megatron.sharding import global_state_dict

    corpus = folder.parent / f"{folder.name}-corpus.txt"
    corpus.write_text("\n".join(f"def function_{i}(x):\n    return x * {i} + {i * i}  # é ü" for i in range(200)))
    tokenizer = train_tokenizer([str(corpus)], str(folder.parent / f"{folder.name}.model"), VOCAB)
    model = PrismLM(ModelConfig(**config), ParallelConfig(), seed=0)
    return write_export(folder, global_state_dict(model), config, 0, Path(tokenizer))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return write_exported(tmp_path_factory.mktemp("generate") / "exported", CONFIG)


def command_env() -> dict[str, str]:
    """This process's environment for a command run as a user runs it: without this process's
    rendezvous (the variables initialize_parallel sets), which would send the command to its port."""
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in rendezvous}


def prism_generate(*args, check: bool = True) -> subprocess.CompletedProcess:
    # Run from outside the checkout, as an installed command runs.
    env = {**command_env(), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "prism_megatron.launch.generate", *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=Path.home())
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _own_greedy(folder: Path, prompts: list[str], steps: int) -> list[str]:
    """The model's greedy continuations, each prompt on its own."""
    from prism_megatron.data_prep.tokenizer import Tokenizer
    from prism_megatron.decoding import Sampling, generate
    from prism_megatron.launch.checkpoint import load_exported

    model, tokenizer = load_exported(folder), Tokenizer(folder / "tokenizer.model")
    texts = []
    for prompt in prompts:
        ids = tokenizer.encode_arrays([prompt])[0].tolist()
        texts.append(tokenizer.decode(generate(model, [ids], steps, Sampling(temperature=0), tokenizer.eos_id)[0]))
    return texts


def test_generate_streams_the_greedy_continuation(exported):
    result = prism_generate(exported, "--prompt", "def function_", "--max-new-tokens", 6, "--temperature", 0)
    want = _own_greedy(exported, ["def function_"], 6)[0]
    assert result.stdout == "def function_" + want + "\n"
    assert "prefill: " in result.stderr and "ms per token" in result.stderr


def test_a_batch_of_prompts_of_different_lengths(exported, tmp_path):
    prompts = ["def function_12(x):", "    return"]
    batch = tmp_path / "prompts.txt"
    batch.write_text("\n".join(prompts) + "\n")
    result = prism_generate(exported, "--batch-file", batch, "--max-new-tokens", 5, "--temperature", 0)
    lines = result.stdout.splitlines()
    for n, (prompt, want) in enumerate(zip(prompts, _own_greedy(exported, prompts, 5))):
        assert f"[{n}] {prompt}{want}" in lines
    # Sampling is seeded.
    sampled = [prism_generate(exported, "--batch-file", batch, "--max-new-tokens", 5, "--top-p", 0.9, "--top-k", 20,
                              "--seed", 3).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_an_empty_prompt_generates_from_bos(exported):
    assert "BOS" in prism_generate("--help").stdout
    result = prism_generate(exported, "--prompt", "", "--max-new-tokens", 3)
    assert "ms per token" in result.stderr


def test_sampling_limits():
    from prism_megatron.decoding import Sampling

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(Sampling(temperature=0).draw(logits, gen), greedy)
    assert torch.equal(Sampling(top_k=1).draw(logits, gen), greedy)
    assert torch.equal(Sampling(top_p=1e-6).draw(logits, gen), greedy)
    top3 = logits.topk(3, -1).indices
    for _ in range(5):
        drawn = Sampling(temperature=2.0, top_k=3).draw(logits, gen)
        assert (top3 == drawn[:, None]).any(-1).all()


@pytest.mark.parametrize("case", ["no-export-files", "no-intact-checkpoint", "not-a-folder", "zero-tokens",
                                  "negative-tokens", "ids-outside"])
def test_bad_input_is_one_line(case, exported, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((exported / "config.json").read_text())
    (tmp_path / "ckpt" / "step_00000002").mkdir(parents=True)
    args, code, words = {
        "no-export-files": ((partial, "--prompt", "x"), 1, "lacks model.safetensors, tokenizer.model"),
        "no-intact-checkpoint": ((tmp_path / "ckpt", "--prompt", "x"), 1, "no checkpoint"),
        "not-a-folder": ((tmp_path / "absent", "--prompt", "x"), 1, "is not a folder"),
        "zero-tokens": ((exported, "--max-new-tokens", 0), 2, "--max-new-tokens must be >= 1"),
        "negative-tokens": ((exported, "--max-new-tokens", -3), 2, "--max-new-tokens must be >= 1"),
        "ids-outside": ((exported, "--prompt-ids", f"5,{VOCAB},-1"), 2, f"ids [{VOCAB}, -1] are outside"),
    }[case]
    assert_refused(prism_generate(*args, check=False), "prism-generate", code, words)


def assert_refused(result: subprocess.CompletedProcess, command: str, code: int, words: str) -> None:
    """A refusal as a user sees it: exit `code` and one error line naming `words`, the last line (a
    skipped damaged checkpoint is named on a line before it), no traceback."""
    assert result.returncode == code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error: ") and words in last, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error") == 1


def test_generation_benchmark_scripts_explain_their_usage(tmp_path):
    """benchmarks/generate.py (the GPU benchmark against fla's model) describes its arguments without a
    GPU, and benchmarks/generate_gpu.sh, run with a part it does not have, says how to run it and exits 2
    before it installs or writes anything."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generate.py"), "--help"], capture_output=True,
                            text=True, timeout=120, env=command_env())
    assert result.returncode == 0, result.stderr
    assert "--prompts" in result.stdout and "--profile" in result.stdout
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "generate_gpu.sh"), str(tmp_path / "out"), "fla-gdn"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "tests|profile|prism|fla" in result.stderr
    assert not (tmp_path / "out").exists()
