"""`prism-eval`: a checkpoint's loss and perplexity on its token stores' held-out documents.

    prism-eval CHECKPOINT [--stores STORE ...] [--samples N] [--micro-batch-size B] [--tensor-parallel T]
    torchrun --nproc-per-node N -m prism_megatron.launch.eval CHECKPOINT --tensor-parallel T ...

CHECKPOINT is one checkpoint or a run's checkpoint.dir (its newest intact checkpoint). The held-out
documents are the validation split prism-train evaluates on (the run's data.valid_fraction: documents
chosen by a hash of their index), laid out in the run's samples of data.seq_length tokens; --stores
takes them from other stores made with the same tokenizer. By default every held-out token is evaluated
once; --samples N takes the first N samples of the validation order instead (with the run's
logging.eval_steps x training.micro_batch_size, the samples of the run's own validation loss). Ranks
split the samples (data parallel = world size / tensor parallel). A progress bar goes to stderr and one
JSON line to stdout: checkpoint, step, stores, samples, tokens, loss (mean token cross-entropy, nats)
and perplexity.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prism-eval", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint or a run's checkpoint.dir")
    parser.add_argument("--stores", nargs="+", default=None, help="token stores to evaluate on (default: the run's)")
    parser.add_argument("--samples", type=int, default=None,
                        help="evaluate the first N samples of the validation order (default: all held-out tokens once)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="samples per forward on each rank (default: the run's training.micro_batch_size)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size (must divide the world size)")
    args = parser.parse_args(argv)
    for name in ("samples", "micro_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"prism-eval: error: {message}", file=sys.stderr)
    sys.exit(code)


def held_out_loader(path: Path, args: argparse.Namespace, vocab_size: int):
    """(the DistributedBatchLoader of this rank's held-out samples, the stores, the number of samples, seq_length)."""
    from prism_megatron.data_prep.loader import DistributedBatchLoader, PackedDataset, held_out_samples
    from prism_megatron.data_prep.store import TokenStore
    from prism_megatron.data_prep.verify import ShardVerifier
    from prism_megatron.launch.checkpoint.format import read_run_config
    from prism_megatron.process_groups import data_rank, data_size

    run = read_run_config(path)
    data, training = run["data"], run["training"]
    stores = args.stores or data["stores"]
    opened = [TokenStore.open(store) for store in stores]
    samples = args.samples or held_out_samples(opened, data["seq_length"], data["valid_fraction"])
    if samples < 1:
        raise ValueError(f"stores {stores} hold fewer held-out tokens than one sample of {data['seq_length']} "
                         f"(valid_fraction {data['valid_fraction']})")
    # The run's blend weights belong to the run's stores.
    weights = None if args.stores else data["weights"]
    dataset = PackedDataset(stores, weights, data["seq_length"], training["seed"], samples, split="valid",
                            valid_fraction=data["valid_fraction"])
    loader = DistributedBatchLoader(dataset, args.micro_batch_size or training["micro_batch_size"], data_rank(),
                                    data_size(), with_cu_seqlens=data["with_cu_seqlens"],
                                    verifier=ShardVerifier(opened, vocab_size), drop_last=False)
    return loader, stores, samples, data["seq_length"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # DeepSpeed is imported only for the names of its checkpoint records: no accelerator is used.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch.distributed as dist
    from tqdm import tqdm

    from prism_megatron.config import ParallelConfig
    from prism_megatron.data_prep.store import TokenStoreError
    from prism_megatron.launch import preemption
    from prism_megatron.launch.checkpoint.export import load_checkpointed
    from prism_megatron.launch.checkpoint.format import CheckpointError, read_run_config
    from prism_megatron.launch.ckpt import one_checkpoint
    from prism_megatron.launch.evaluate import Evaluator
    from prism_megatron.process_groups import deepspeed_mpu, destroy_parallel, initialize_parallel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        initialize_parallel(ParallelConfig(tensor_model_parallel_size=args.tensor_parallel), seed=0)
    except ValueError as e:
        fail(str(e))
    rank0 = dist.get_rank() == 0
    try:
        path = one_checkpoint(args.checkpoint)
        # In float32 (load_checkpointed builds it so), whatever the run's dtype.
        model, step = load_checkpointed(path, ParallelConfig(tensor_model_parallel_size=args.tensor_parallel))
        model = model.to(device)
        loader, stores, samples, seq_length = held_out_loader(path, args, model.cfg.vocab_size)
        watchdog = preemption.Watchdog(read_run_config(path)["training"]["fault_timeout"])
        progress = tqdm(loader, desc="prism-eval", unit=" batches", disable=not rank0, file=sys.stderr)
        evaluator = Evaluator(progress, model, deepspeed_mpu().get_data_parallel_group(), preemption.StopRequest(),
                              watchdog)
        loss = evaluator()
        watchdog.stop()
    except (CheckpointError, TokenStoreError, ValueError, OSError) as e:
        destroy_parallel()
        fail(str(e), EXIT_BAD_INPUT if isinstance(e, (TokenStoreError, ValueError)) else 1)
    destroy_parallel()
    if loss is None:
        fail("stopped by a signal before the end of the evaluation", 1)
    if rank0:
        print(json.dumps({"checkpoint": str(path), "step": step, "stores": [str(s) for s in stores], "samples": samples,
                          "tokens": samples * seq_length, "loss": loss, "perplexity": math.exp(loss)}))


if __name__ == "__main__":
    main()
