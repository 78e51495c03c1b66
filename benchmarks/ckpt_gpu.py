"""The checkpoint round trip on one GPU, timed: prism-train writes a checkpoint of the 1.3B preset
(bf16, ZeRO-1), then prism-ckpt inspects, converts and exports it, the export loads into PrismLM,
and --resume continues it at another layout (ZeRO-2: the only other layout one GPU has).

    python benchmarks/ckpt_gpu.py OUT_DIR [--config launch/configs/1.3b.yaml] [--scratch DIR] [--set key=value ...]

Run from the checkout (it puts the checkout on PYTHONPATH). OUT_DIR gets times.json (seconds per
stage, the losses, the sizes) and one log per stage; the checkpoints live in --scratch (default
OUT_DIR/scratch; at 1.3B about 60 GB: the step-2 checkpoint, its layout-free form and the resumed
run's step-4 checkpoint). The token store is built from the Python standard library's sources.
The first run is killed (SIGKILL) once its step-2 checkpoint is committed, so that the resumed
run redoes steps 3-4 from it. For a CPU-sized check: --config launch/configs/tiny.yaml
--set training.precision=fp32 --set data.seq_length=64 --set data.num_workers=0.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default=str(ROOT / "launch/configs/1.3b.yaml"))
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = args.out.resolve()
    scratch = (args.scratch or out / "scratch").resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    times: dict = {}

    def record() -> None:
        (out / "times.json").write_text(json.dumps(times, indent=1))

    def stage(name: str, *cmd: str) -> str:
        started = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            result = subprocess.run([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        times[name] = round(time.perf_counter() - started, 2)
        record()
        text = (out / f"{name}.log").read_text()
        if result.returncode != 0:
            sys.exit(f"{name} failed (exit {result.returncode}); see {out / f'{name}.log'}:\n{text[-2000:]}")
        return text

    corpus = scratch / "corpus.jsonl"
    with open(corpus, "w") as f:
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")
    stage("tokenizer", "-m", "prism_megatron.data_prep.cli", "tokenizer", str(corpus),
          "--output", str(scratch / "tok.model"), "--vocab-size", "2048")
    if not (scratch / "store" / "manifest.json").is_file():
        stage("tokenize", "-m", "prism_megatron.data_prep.cli", "tokenize", str(corpus),
              "--tokenizer", str(scratch / "tok.model"), "--output", str(scratch / "store"), "--workers", "4")
    ckpts = scratch / "ckpt"
    train = ["-m", "prism_megatron.launch.train", "--config", args.config,
             "--set", f"data.stores=[{scratch / 'store'}]", "--set", f"checkpoint.dir={ckpts}",
             "--set", f"training.train_steps={STEPS}", "--set", "optim.warmup_steps=1",
             "--set", "training.micro_batch_size=2", "--set", "training.global_batch_size=4",
             "--set", "checkpoint.save_interval=2", "--set", "checkpoint.keep_last=0",
             "--set", "logging.log_interval=1", "--set", "logging.eval_interval=1000",
             "--set", "logging.eval_steps=2", *[x for kv in args.set for x in ("--set", kv)]]

    # 1. Train until the step-2 checkpoint is committed, then kill the run (as a preemption would).
    started = time.perf_counter()
    log_path = out / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *train, "--set", f"logging.tensorboard_dir={scratch / 'tb'}"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None and "saved checkpoint" not in log_path.read_text():
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    times["train_2_steps_and_save"] = round(time.perf_counter() - started, 2)
    record()
    if "saved checkpoint" not in log_path.read_text():
        sys.exit(f"training wrote no checkpoint; see {log_path}")
    step = ckpts / "step_00000002"
    times["checkpoint_bytes"] = sum(f.stat().st_size for f in step.iterdir() if f.is_file())

    # 2. Inspect (hashes every file), convert, export, load the export.
    stage("inspect", "-m", "prism_megatron.launch.ckpt", "inspect", str(step))
    stage("convert", "-m", "prism_megatron.launch.ckpt", "convert", str(step))
    times["layout_free_bytes"] = sum(f.stat().st_size for f in (step / "layout_free").iterdir())
    export = scratch / "export"
    stage("export", "-m", "prism_megatron.launch.ckpt", "export", str(step), str(export))
    times["export_bytes"] = sum(f.stat().st_size for f in export.iterdir())
    text = stage("load_export", "-c", (
        "import time, torch\n"
        "from prism_megatron.process_groups import initialize_parallel\n"
        "from prism_megatron.config import ParallelConfig\n"
        "from prism_megatron.launch.checkpoint import load_exported\n"
        "initialize_parallel(ParallelConfig(), 0)\n"
        "t = time.perf_counter()\n"
        f"model = load_exported({str(export)!r})\n"
        "print(f'loaded in {time.perf_counter() - t:.1f} s')\n"
        "if torch.cuda.is_available():\n"
        "    model = model.cuda().to(torch.bfloat16)\n"
        "tokens = torch.randint(0, 2048, (1, 256), device=next(model.parameters()).device)\n"
        "print('logits', tuple(model.gather_logits(model(tokens)).shape))\n"))
    times["load_export_log"] = text.strip().splitlines()[-2:]
    subprocess.run(["rm", "-rf", str(export)], check=True)  # disk: the resumed run writes another checkpoint

    # 3. Resume at ZeRO-2 from the step-2 checkpoint (its layout-free form, made in step 2).
    if (ckpts / "step_00000004").exists():  # a kill that came late
        subprocess.run(["rm", "-rf", str(ckpts / "step_00000004")], check=True)
    text = stage("resume", *train, "--set", "training.zero_stage=2", "--set",
                 f"logging.tensorboard_dir={scratch / 'tb_resumed'}", "--resume")
    if "loading its layout-free form" not in text or "resumed from" not in text:
        sys.exit(f"the resumed run did not load the layout-free form; see {out / 'resume.log'}")
    times["losses_before_kill"] = [line for line in log_path.read_text().splitlines() if "| loss" in line]
    times["losses_resumed"] = [line for line in text.splitlines() if "| loss" in line]
    record()
    print(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
