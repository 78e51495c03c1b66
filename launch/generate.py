"""`prism-generate`: text from a trained model, a token at a time from its recurrent state.

    prism-generate FOLDER_OR_CHECKPOINT --prompt TEXT [--max-new-tokens N --temperature T --top-p P
                   --top-k K --seed S] [--batch-file FILE] [--prompt-ids 5,17,3]

FOLDER_OR_CHECKPOINT is a `prism-ckpt export` folder (model.safetensors, config.json, tokenizer.model),
one checkpoint (checkpoint.dir/step_NNNNNNNN) or a run's checkpoint.dir (its newest intact checkpoint;
the tokenizer is the one its token stores were made with). One process, on a GPU if there is one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prism-generate", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an exported folder, a checkpoint or a run's checkpoint.dir")
    parser.add_argument("--prompt", default="",
                        help="the text to continue; an empty prompt generates from the BOS token alone")
    parser.add_argument("--prompt-ids", default=None,
                        help="the prompt as comma-separated token ids instead of text")
    parser.add_argument("--batch-file", type=Path, default=None,
                        help="a file of prompts, one a line, generated together as one batch (instead of --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (>= 1; fewer if EOS comes)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set reaching probability P")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        fail("--temperature and --top-k must be >= 0 and --top-p in (0, 1]")
    return args


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    print(f"prism-generate: error: {message}", file=sys.stderr)
    sys.exit(code)


def load(source: Path, device: torch.device):
    """(PrismLM at TP=1 on `device`, in float32 off CUDA, the Tokenizer) of an exported folder or a checkpoint."""
    from prism_megatron.data_prep.tokenizer import Tokenizer
    from prism_megatron.launch.checkpoint import load_exported
    from prism_megatron.launch.checkpoint.export import (EXPORT_CONFIG, EXPORT_TOKENIZER, EXPORT_WEIGHTS,
                                                         load_checkpointed, tokenizer_of)
    from prism_megatron.launch.checkpoint.format import CheckpointError
    from prism_megatron.launch.ckpt import one_checkpoint

    export_files = (EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_TOKENIZER)
    if (source / EXPORT_CONFIG).is_file() or (source / EXPORT_WEIGHTS).is_file():
        missing = [name for name in export_files if not (source / name).is_file()]
        if missing:
            raise CheckpointError(f"{source} is not a whole exported model: it lacks {', '.join(missing)}")
        model, tokenizer = load_exported(source), Tokenizer(source / EXPORT_TOKENIZER)
    elif source.is_dir():
        path = one_checkpoint(source)
        model, _ = load_checkpointed(path)
        tokenizer = Tokenizer(tokenizer_of(path))
    else:
        raise CheckpointError(f"{source} is not a folder (an exported model, a checkpoint or a checkpoint.dir)")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer's {tokenizer.vocab_size} pieces exceed the model's "
                              f"vocabulary of {model.cfg.vocab_size}")
    model = model.to(device)
    return (model if device.type == "cuda" else model.float()).eval(), tokenizer


def prompt_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> list[list[int]]:
    """The prompts as token ids; an empty one is the BOS token alone."""
    if args.prompt_ids is not None:
        try:
            prompts = [[int(t) for t in args.prompt_ids.split(",") if t.strip()]]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        outside = [t for t in prompts[0] if not 0 <= t < vocab_size]
        if outside:
            raise ValueError(f"--prompt-ids: ids {outside} are outside the vocabulary [0, {vocab_size})")
    elif args.batch_file is not None:
        try:
            lines = args.batch_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--batch-file {args.batch_file}: cannot read it ({e})") from None
        prompts = [ids.tolist() for ids in tokenizer.encode_arrays(lines)]
    else:
        prompts = [ids.tolist() for ids in tokenizer.encode_arrays([args.prompt])]
    return [ids or [tokenizer.bos_id] for ids in prompts]


def timing_line(sequences: int, prompt_tokens: int, started: float, step_times: list[float]) -> str:
    """The prefill's time (to the first new token) and the time per generated token after it."""
    line = f"prefill: {prompt_tokens} tokens in {step_times[0] - started:.3f} s"
    if len(step_times) > 1:
        per_token = (step_times[-1] - step_times[0]) / (len(step_times) - 1)
        line += f" | decode: {1000 * per_token:.2f} ms per token (batch of {sequences})"
    return line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from prism_megatron.config import ParallelConfig
    from prism_megatron.decoding import Sampling, generate
    from prism_megatron.launch.checkpoint.format import CheckpointError
    from prism_megatron.process_groups import destroy_parallel, initialize_parallel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    initialize_parallel(ParallelConfig(), seed=args.seed)
    try:
        model, tokenizer = load(args.source, device)
        prompts = prompt_ids(args, tokenizer, model.cfg.vocab_size)
    except (CheckpointError, ValueError, OSError) as e:
        destroy_parallel()
        fail(str(e), EXIT_BAD_INPUT if isinstance(e, ValueError) else 1)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    generator = torch.Generator(device).manual_seed(args.seed)
    stream = len(prompts) == 1
    if stream:
        print(tokenizer.decode(prompts[0]), end="", flush=True)
    first: list[int] = []
    step_times: list[float] = []

    def on_tokens(step: int, tokens: torch.Tensor) -> None:
        step_times.append(time.perf_counter())
        if stream:
            before = tokenizer.decode(first)
            first.append(int(tokens[0]))
            print(tokenizer.decode(first)[len(before):], end="", flush=True)

    started = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, sampling, tokenizer.eos_id, generator, on_tokens)
    if stream:
        print()
    else:
        for n, (prompt, output) in enumerate(zip(prompts, outputs)):
            print(f"[{n}] {tokenizer.decode(prompt)}{tokenizer.decode(output)}")
    print(timing_line(len(prompts), sum(map(len, prompts)), started, step_times), file=sys.stderr)
    destroy_parallel()


if __name__ == "__main__":
    main()
