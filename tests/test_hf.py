"""The transformers model (prism_megatron/hf/) and lm-eval on it: an export folder loaded with
AutoModelForCausalLM and AutoTokenizer gives PrismLM's logits, tokens and ids; generate() runs greedy,
sampled, in beams and on padded batches with the recurrent cache; `lm_eval --model hf` on a local task
scores as PrismLM does; the training path imports none of it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from test_generate import REPO, VOCAB, command_env, write_exported

TEXTS = ["def function_12(x):", "    return x * 3", "  two  spaces\n\nand\ttabs", "é ü 中文 🙂 naïve", "</s> spelled"]

pytestmark = pytest.mark.usefixtures("single_process")


def demo_model_config() -> dict:
    """The demo's model (launch/configs/demo.yaml) at the tokenizer's vocabulary (VOCAB: not a multiple of
    the vocabulary padding, so the export's unpadded tensors must be padded on loading)."""
    model = yaml.safe_load((REPO / "launch" / "configs" / "demo.yaml").read_text())["model"]
    return {**model, "vocab_size": VOCAB}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return write_exported(tmp_path_factory.mktemp("hf") / "exported", demo_model_config())


@pytest.fixture(scope="module")
def loaded(exported):
    """(the transformers model, its tokenizer, PrismLM of the same folder, our sentencepiece Tokenizer)."""
    import prism_megatron.hf  # noqa: F401 (registers the Auto classes)
    from prism_megatron.data_prep.tokenizer import Tokenizer
    from prism_megatron.launch.checkpoint import load_exported
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(exported), AutoTokenizer.from_pretrained(exported),
            load_exported(exported).eval(), Tokenizer(exported / "tokenizer.model"))


def test_the_tokenizer_gives_sentencepiece_ids(loaded):
    from prism_megatron.hf import PrismTokenizer

    _, tokenizer, _, ours = loaded
    assert isinstance(tokenizer, PrismTokenizer)
    for text in TEXTS:
        ids = ours.encode_arrays([text])[0].tolist()
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (ours.bos_id, ours.eos_id,
                                                                                        ours.pad_id)
    # Special tokens read as their text unless skipped (lm-eval stops generating at EOS's text).
    assert tokenizer.decode(ids + [ours.eos_id]) == TEXTS[-1] + "</s>"
    assert tokenizer.decode(ids + [ours.eos_id], skip_special_tokens=True) == TEXTS[-1]


def test_logits_equal_prismlm(loaded):
    from prism_megatron.hf import PrismForCausalLM

    model, _, prism, _ = loaded
    assert isinstance(model, PrismForCausalLM) and model.dtype == torch.float32
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = prism.gather_logits(prism(tokens))
        got = model(tokens, use_cache=False).logits
        cached = model(tokens).logits  # the prefill of a cache
        last = model(tokens, logits_to_keep=1).logits  # what generate() asks of a prompt
    assert got.shape == (2, 24, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want[:, -1:], rtol=1e-5, atol=1e-5)


def _own_greedy(prism, prompts: list[list[int]], steps: int, eos_id: int) -> list[list[int]]:
    """decoding.generate's greedy continuation of each prompt on its own."""
    from prism_megatron.decoding import Sampling, generate

    return [generate(prism, [ids], steps, Sampling(temperature=0), eos_id)[0] for ids in prompts]


def test_greedy_generate_gives_our_tokens(loaded):
    model, tokenizer, prism, ours = loaded
    ids = tokenizer("def function_1", return_tensors="pt")["input_ids"]
    widths = []  # of the logits of each forward: the prompt's last position only, then each new token's
    hook = model.register_forward_hook(lambda module, args, out: widths.append(out.logits.shape[1]))
    try:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        hook.remove()
    assert widths == [1] * 8
    want = _own_greedy(prism, [ids[0].tolist()], 8, ours.eos_id)[0]
    assert out[0, ids.shape[1]:].tolist() == want


def test_a_padded_batch_is_each_prompt_alone(loaded):
    """Padded positions never enter the state: each row's logits (left or right padding) and greedy
    tokens are its own."""
    model, tokenizer, prism, ours = loaded
    with torch.no_grad():
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer(TEXTS[:3], return_tensors="pt", padding=True)
            assert not batch["attention_mask"].all()
            logits = model(**batch).logits
            torch.testing.assert_close(model(**batch, logits_to_keep=2).logits, logits[:, -2:], msg=side)
            for row, text in enumerate(TEXTS[:3]):
                ids = torch.tensor([ours.encode_arrays([text])[0].tolist()])
                want = prism.gather_logits(prism(ids))[0]
                place = slice(0, ids.shape[1]) if side == "right" else slice(-ids.shape[1], None)
                torch.testing.assert_close(logits[row, place], want, rtol=1e-5, atol=1e-5, msg=side)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompts = [ours.encode_arrays([t])[0].tolist() for t in TEXTS[:3]]
    for row, want in enumerate(_own_greedy(prism, prompts, 6, ours.eos_id)):
        got = out[row, batch["input_ids"].shape[1]:].tolist()
        assert got[:len(want)] == want, row


def test_the_export_runs_as_the_loading_device_runs_best(exported):
    """The demo trains with kernel_backend "torch"; its export leaves the kernels (and recomputation) to
    ModelConfig's defaults, so that on a GPU the Triton kernels prefill."""
    import json

    assert demo_model_config()["kernel_backend"] == "torch"
    model = json.loads((exported / "config.json").read_text())["model"]
    assert (model["kernel_backend"], model["recompute"], model["fused_ops"]) == ("auto", "none", "auto")


@pytest.mark.gpu
def test_bf16_on_gpu_gives_our_logits_and_tokens(exported):
    """On CUDA in bf16 (the chunk kernel prefills, the fused step decodes) the transformers model gives
    PrismLM's logits and greedy tokens."""
    import prism_megatron.hf  # noqa: F401 (registers the Auto classes)
    from prism_megatron.launch.checkpoint import load_exported
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exported
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prism = load_exported(folder).cuda().bfloat16().eval()
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"].cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, prism.gather_logits(prism(ids)).float(), rtol=1.6e-2, atol=1.6e-2)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == _own_greedy(prism, [ids[0].tolist()], 8, tokenizer.eos_token_id)[0]


@pytest.mark.gpu
def test_beam_search_on_gpu_decodes_from_the_reordered_cache(exported):
    """On CUDA generate() decodes a token at a time as a CUDA graph over the cache's tensors; beam search
    reorders the cache into new tensors between steps, after which the old graph must not be replayed:
    with the cache it gives the beams it gives without one (float32)."""
    import prism_megatron.hf  # noqa: F401 (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported, device_map="cuda")
    batch = AutoTokenizer.from_pretrained(exported)(TEXTS[:2], return_tensors="pt", padding=True).to("cuda")
    options = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(model.generate(**batch, **options), model.generate(**batch, **options, use_cache=False))


def test_sampling_runs_seeded(loaded):
    from transformers import set_seed

    model, tokenizer, _, _ = loaded
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    runs = []
    for _ in range(2):
        set_seed(5)
        runs.append(model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, batch["input_ids"].shape[1] + 6) and runs[0].max() < VOCAB


CHOICES = [{"question": "def function_3(x):\n    return x *", "choices": ["3", "7", "x"], "answer": 0},
           {"question": "def function_5(x):", "choices": ["return", "def", "é"], "answer": 0},
           {"question": "    return x * 12 +", "choices": ["144", "1", "ü"], "answer": 0}]
CONTINUATIONS = [{"prompt": "def function_1", "target": "2(x):"}, {"prompt": "    return x * 9 +", "target": " 81"},
                 {"prompt": "def", "target": " function"}]
MAX_GEN_TOKS = 6
TASKS = {"prism_choice": ("multiple_choice", CHOICES, {"doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                                                       "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}),
         "prism_continue": ("generate_until", CONTINUATIONS, {
             "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}", "metric_list": [{"metric": "exact_match"}],
             "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False}})}


def write_tasks(folder: Path) -> Path:
    """A local lm-eval task directory: one jsonl and one yaml per task."""
    import json

    folder.mkdir()
    for name, (output_type, docs, fields) in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": output_type, **fields}))
    return folder


def lm_eval(folder: Path, tasks: Path, out: Path) -> dict:
    """`lm_eval --model hf` as a user runs it, offline; (the results, {task: its logged samples})."""
    import json
    import subprocess
    import sys

    # The project as installed: only prism_megatron importable, not the checkout's root, whose kernels/
    # folder would take the name of the `kernels` package that transformers imports (hf/hub_kernels.py).
    installed = out / "site"
    installed.mkdir(parents=True)
    (installed / "prism_megatron").symlink_to(REPO / "prism_megatron")
    env = {**command_env(), "PYTHONPATH": str(installed), "HF_HOME": str(out / "hf-home"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
           "--model_args", f"pretrained={folder},trust_remote_code=True", "--tasks", ",".join(TASKS),
           "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu", "--output_path", str(out / "results"),
           "--log_samples"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (out / "results").rglob("results_*.json")
    samples = {name: [json.loads(line) for line in next((out / "results").rglob(f"samples_{name}_*.jsonl")).open()]
               for name in TASKS}
    return json.loads(results.read_text())["results"], samples


def _loglikelihood(prism, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether it is the greedy continuation, from PrismLM; the
    continuation's tokens are those of context + continuation after the context's (lm-eval's split)."""
    whole = tokenizer.encode_arrays([context + continuation])[0].tolist()
    context_ids = tokenizer.encode_arrays([context])[0].tolist()
    with torch.no_grad():
        logits = prism.gather_logits(prism(torch.tensor([whole[:-1]])))[0]
    logprobs = logits.float().log_softmax(-1)[len(context_ids) - 1:]
    targets = torch.tensor(whole[len(context_ids):])
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return picked.sum().item(), bool((logprobs.argmax(-1) == targets).all())


def test_lm_eval_scores_equal_ours(exported, loaded, tmp_path):
    from prism_megatron.decoding import Sampling, generate

    _, _, prism, tokenizer = loaded
    results, samples = lm_eval(exported, write_tasks(tmp_path / "tasks"), tmp_path)

    correct = []
    for doc, sample in zip(CHOICES, sorted(samples["prism_choice"], key=lambda s: s["doc_id"])):
        ours = [_loglikelihood(prism, tokenizer, doc["question"], " " + choice) for choice in doc["choices"]]
        theirs = [(float(ll), greedy == "True") for ll, greedy in sample["filtered_resps"]]
        for (ll, greedy), (their_ll, their_greedy) in zip(ours, theirs):
            assert ll == pytest.approx(their_ll, rel=1e-5, abs=1e-4) and greedy == their_greedy, (doc, ours, theirs)
        correct.append(max(range(len(ours)), key=lambda i: ours[i][0]) == doc["answer"])
    assert results["prism_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    matches = []
    for doc, sample in zip(CONTINUATIONS, sorted(samples["prism_continue"], key=lambda s: s["doc_id"])):
        ids = tokenizer.encode_arrays([doc["prompt"]])[0].tolist()
        tokens = generate(prism, [ids], MAX_GEN_TOKS, Sampling(temperature=0), tokenizer.eos_id)[0]
        text = tokenizer.decode(tokens).split("\n")[0]
        assert sample["filtered_resps"] == [text], doc
        matches.append(text == doc["target"])
    assert results["prism_continue"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))


def test_the_training_path_does_not_import_transformers():
    """transformers and lm-eval are an extra (`hf`): prism-train, prism-ckpt (whose export writes the
    transformers files) and prism-generate run without them."""
    import subprocess
    import sys

    commands = ["prism_megatron.launch.train", "prism_megatron.launch.ckpt", "prism_megatron.launch.generate"]
    code = (f"import sys, {', '.join(commands)}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lm_eval', 'accelerate')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**command_env(), "PYTHONPATH": str(REPO)}, cwd=Path.home())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_beam_search_reorders_the_cache(loaded):
    """Beam search forks and drops sequences: with the cache reordered, its result is that of recomputing
    every sequence from the start at each step."""
    model, tokenizer, _, _ = loaded
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    options = dict(max_new_tokens=5, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(model.generate(**batch, **options), model.generate(**batch, **options, use_cache=False))


def test_what_the_model_cannot_do_is_refused(loaded, exported, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    model, _, _, _ = loaded
    with pytest.raises(NotImplementedError, match="prism-ckpt export"):
        model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="cannot apply quantization_config"):
        AutoModelForCausalLM.from_pretrained(exported, quantization_config={"load_in_8bit": True})
    with pytest.raises(ValueError, match="holds a PEFT adapter"):
        AutoModelForCausalLM.from_pretrained(exported, adapter_kwargs={"_adapter_model_path": str(exported)})
    partial = tmp_path / "partial"
    shutil.copytree(exported, partial, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(OSError, match=f"{partial / 'model.safetensors'}: cannot read the exported weights"):
        AutoModelForCausalLM.from_pretrained(partial)


def test_loads_where_peft_is_installed(exported):
    """With peft installed transformers' Auto class passes adapter_kwargs with the hub revision even for
    a folder without an adapter (the GPU machine's image has peft): the folder still loads."""
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(exported, adapter_kwargs={"revision": "main"}).config.vocab_size == VOCAB
