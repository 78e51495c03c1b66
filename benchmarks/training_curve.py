"""The training-curve guard: a pinned short run per solver (prism, split, none) whose per-step
training loss and gradient norm and whose validation losses are kept in the repository as golden
values, as Megatron's functional tests keep theirs, and compared with a fresh run.

    python benchmarks/training_curve.py check  --device cpu|gpu   # train, compare with tests/golden/curves-DEVICE.json
    python benchmarks/training_curve.py update --device cpu|gpu   # train, write tests/golden/curves-DEVICE.json
    python benchmarks/training_curve.py run    --device cpu|gpu   # train, print the curves (JSON)

The run is `tests/golden/curves.yaml` (a tiny model, 30 steps) trained through
`prism_megatron.launch.train.train` on a token store the guard writes itself: documents of key-value
pairs drawn from Python's `random.Random(seed).random()`, whose sequence Python guarantees across
versions and platforms, so the data are the same everywhere (a key's value is fixed within its
document: predicting it after the key's second appearance needs the recurrence's memory).

`--device cpu` trains in float32 with the fused ops off (what `auto` picks there); the test suite runs
it (tests/test_training_curve.py). `--device gpu` trains in bf16 with the fused kernels, on one CUDA
device; the parameters are drawn there by CUDA's generator, so its curves are not the CPU's. Its
golden file and tolerance come from `bash benchmarks/rounding_gpu.sh OUT` on a GPU machine, which
writes the golden file (`update`) and trains the same run at other micro batches (`run --set
training.micro_batch_size=N`), whose spread sets the tolerance (docs/QUALITY.md section 10).

A change that moves the curves on purpose (an initialisation, the model, the optimizer, the data
order) runs `update` for each device that has a golden file and commits them in the same commit,
saying why in its message. `check` names each solver, quantity and step that moved, golden against got.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"
CONFIG = GOLDEN_DIR / "curves.yaml"
SOLVERS = ("prism", "split", "none")
QUANTITIES = ("loss", "grad_norm", "val_loss")


# Per device and quantity, the relative tolerance of every step: |got - golden| <= it * |golden|.
TOLERANCE = {
    # Float32 with the fused ops off trains bitwise alike on this machine, run after run and at 1 or 2
    # threads. Another x86 CPU's BLAS may sum in another order: a rounding-only change here (micro
    # batches of 2 instead of 4, the same batches) moved the 30-step curves by at most 1.8e-7
    # relative, a float32 rounding or two. 1e-6 passes such rounding and fails a change that is more
    # than one: prism's initial gain bias moved by 1e-3 fails it (the gradient norm by 5e-5 at step 1).
    "cpu": dict.fromkeys(QUANTITIES, 1e-6),
    # bf16 on a GPU repeats itself bitwise, but a rounding-only change (micro batches of 1, 2 or 8
    # instead of 4) moved the curves by up to 2.1e-4 (loss), 3.0e-2 (gradient norm, prism's at step 15)
    # and 4.0e-5 (validation loss) relative on an H100 (docs/QUALITY.md section 10): twice that.
    "gpu": {"loss": 5e-4, "grad_norm": 6e-2, "val_loss": 1e-4},
}

# The synthetic data: token ids 0-3 are pad, unk, bos, eos (the tokenizers' convention), then keys, then values.
EOS_ID = 3
KEYS = range(4, 132)
VALUES = range(132, 256)
DOCUMENTS = 1500
DATA_SEED = 20261206


class GuardError(Exception):
    """A guard that cannot run or whose curves moved; the message says which and why."""


def golden_path(device: str) -> Path:
    return GOLDEN_DIR / f"curves-{device}.json"


def recall_documents(count: int, seed: int) -> list[list[int]]:
    """Documents of (key, value) pairs: each document draws 4-16 keys and a value for each, then
    8-64 pairs of those keys with their values. Keys and values are drawn with a skew to the low ids
    (x * x of a uniform x), so that a model learns their frequencies in its first steps."""
    draw = random.Random(seed).random

    def pick(options: range) -> int:
        x = draw()
        return options[int(x * x * len(options))]

    documents = []
    for _ in range(count):
        values = {pick(KEYS): pick(VALUES) for _ in range(4 + int(draw() * 13))}
        keys = sorted(values)
        pairs = [int(draw() * len(keys)) for _ in range(8 + int(draw() * 57))]
        documents.append([token for i in pairs for token in (keys[i], values[keys[i]])])
    return documents


def write_store(folder: Path) -> str:
    """The guard's token store: one shard of recall_documents, tokenizer identity naming the data."""
    from prism_megatron.data_prep.store import ShardWriter, write_manifest

    documents = recall_documents(DOCUMENTS, DATA_SEED)
    with ShardWriter(folder / "shards" / "00000.zarr", "uint16") as writer:
        writer.add_documents(documents)
        shard = writer.commit()
    identity = {"sha256": hashlib.sha256(f"training-curve recall data, seed {DATA_SEED}".encode()).hexdigest(),
                "vocab_size": VALUES.stop, "eos_id": EOS_ID, "bos_id": 2, "pad_id": 0}
    write_manifest(folder, identity, "uint16", [shard])
    return str(folder)


def train_curve(solver: str, store: str, folder: Path, overrides: list[str]) -> dict:
    """One solver's pinned run: its per-step loss and gradient norm and its validation losses."""
    from prism_megatron.launch.config import load_config
    from prism_megatron.launch.train import train

    cfg = load_config(CONFIG, [f"model.solver={solver}", f"data.stores=[{json.dumps(store)}]",
                               f"checkpoint.dir={json.dumps(str(folder / 'checkpoints'))}",
                               f"logging.tensorboard_dir={json.dumps(str(folder / 'tensorboard'))}", *overrides])
    summary = train(cfg, progress=lambda line: None)
    # The gradient norm is in the run's metrics.jsonl (README, Training), not in its summary.
    records = [json.loads(line) for line in (Path(summary.tensorboard_dir) / "metrics.jsonl").read_text().splitlines()]
    grad_norms = {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}
    steps = sorted(summary.train_losses)
    return {"num_parameters": summary.num_parameters,
            "loss": [summary.train_losses[s] for s in steps],
            "grad_norm": [grad_norms[s] for s in steps],
            "val_loss": {str(s): v for s, v in sorted(summary.val_losses.items())}}


def use_device(device: str) -> str:
    """Make torch see the device the guard runs on; return its name."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    if device == "cpu":
        return f"CPU, torch {torch.__version__}"
    if not torch.cuda.is_available():
        raise GuardError("--device gpu: no CUDA device here (use --device cpu)")
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


def run_curves(device: str, overrides: Sequence[str] = ()) -> dict:
    """Train the pinned run once per solver; the curves and what they were trained on."""
    device_name = use_device(device)
    curves = {}
    # What the stack prints while it trains goes to stderr: `run`'s standard output is the JSON alone.
    with tempfile.TemporaryDirectory(prefix="training-curve-") as tmp, contextlib.redirect_stdout(sys.stderr):
        store = write_store(Path(tmp) / "store")
        for solver in SOLVERS:
            started = time.perf_counter()
            curves[solver] = train_curve(solver, store, Path(tmp) / solver, list(overrides))
            print(f"{solver}: {len(curves[solver]['loss'])} steps, loss {curves[solver]['loss'][-1]:.6f}, "
                  f"val loss {list(curves[solver]['val_loss'].values())[-1]:.6f} "
                  f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return {"device": device_name, "config_sha256": config_digest(), "overrides": list(overrides),
            "date": datetime.date.today().isoformat(), "curves": curves}


def read_golden(device: str) -> dict:
    """The device's golden curves, if it has them."""
    path = golden_path(device)
    if not path.exists():
        raise GuardError(f"{path} does not exist: write it with `update --device {device}`")
    return json.loads(path.read_text())


def config_digest() -> str:
    return hashlib.sha256(CONFIG.read_bytes()).hexdigest()


def compare(golden: dict, got: dict, tolerance: dict[str, float]) -> list[str]:
    """One line per solver and quantity that left the tolerance: its first such step, golden
    against got, and how many steps did."""
    problems = []
    if golden["config_sha256"] != got["config_sha256"]:
        problems.append(f"{CONFIG.name} changed since the golden curves were written: run update")
    for solver in SOLVERS:
        want, have = golden["curves"].get(solver), got["curves"].get(solver)
        if want is None or have is None:
            problems.append(f"{solver}: no curve {'in the golden file' if want is None else 'trained'}")
            continue
        for quantity in QUANTITIES:
            steps = (list(want[quantity]) if quantity == "val_loss" else range(1, len(want[quantity]) + 1))
            pairs = ([(s, want[quantity][s], have[quantity].get(s)) for s in steps] if quantity == "val_loss" else
                     [(s, want[quantity][s - 1], have[quantity][s - 1] if s <= len(have[quantity]) else None)
                      for s in steps])
            bad = [(s, w, h) for s, w, h in pairs if h is None or abs(h - w) > tolerance[quantity] * abs(w)]
            if bad:
                s, w, h = bad[0]
                got_text = "nothing" if h is None else f"{h:.6f} (relative difference {abs(h - w) / abs(w):.1e})"
                problems.append(f"{solver}: {quantity} at step {s}: golden {w:.6f}, got {got_text}; "
                                f"{len(bad)} of {len(pairs)} steps outside rel {tolerance[quantity]:g}")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "check", "update"))
    parser.add_argument("--device", choices=("cpu", "gpu"), required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run only: override a value of the pinned config (another micro batch: the "
                             "rounding spread that sets a device's tolerance)")
    args = parser.parse_args(argv)
    if args.set and args.command != "run":
        parser.error("--set applies to run only: check and update train the pinned config")
    path = golden_path(args.device)
    try:
        golden = read_golden(args.device) if args.command == "check" else {}
        got = run_curves(args.device, args.set)
    except GuardError as e:
        sys.exit(f"training_curve: error: {e}")
    if args.command == "run":
        print(json.dumps(got, indent=1))
    elif args.command == "update":
        path.write_text(json.dumps(got, indent=1) + "\n")
        print(f"wrote {path}")
    else:
        problems = compare(golden, got, TOLERANCE[args.device])
        if problems:
            sys.exit(f"training_curve: the curves moved from {path} ({golden['device']}, {golden['date']}):\n  "
                     + "\n  ".join(problems) + "\nIf the change is meant to move them, run `python "
                     f"benchmarks/training_curve.py update --device {args.device}` and commit the file with it, "
                     "saying why.")
        within = ", ".join(f"{q} {t:g}" for q, t in TOLERANCE[args.device].items())
        print(f"{', '.join(SOLVERS)}: every step within its relative tolerance ({within}) of {path}")


if __name__ == "__main__":
    main()
