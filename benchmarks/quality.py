"""Quality harness: train several model configurations on one token store with the same schedule
and seeds, and compare their validation loss (docs/QUALITY.md).

    python benchmarks/quality.py PLAN.yaml --out DIR [--set KEY=VALUE ...] [--seeds 1,2] [--only NAME ...]
                                 [--parallel N] [--devices 0,1] [--time-limit SECONDS]

A plan names a base run config, the seeds, overrides for every configuration, and the
configurations, each a name with its own overrides (and optionally its own base); paths are read as
prism-train reads them, from the folder the harness runs in:

    base: launch/configs/125m.yaml
    seeds: [1234]
    set: [data.stores=[runs/code-corpus/store]]
    configurations:
      none: {set: [model.solver=none]}
      prism-L3: {set: [model.solver_steps=3]}

Each (configuration, seed) is one `prism-train --resume` subprocess in DIR/runs/NAME/seedS/ (its
config's overrides in the order plan, configuration, --set, then the seed and the run's folders;
the log in train.log, metrics in tensorboard/metrics.jsonl, the settings, device and start in
run.json), up to --parallel at once, the slots taking the --devices in turn (CUDA_VISIBLE_DEVICES).
A run whose metrics hold its final validation loss is finished and is not trained again, so plans
that share a DIR share their runs (a folder holding other settings under the same name and seed is
refused); any other run resumes from its newest checkpoint, so the same command continues an
interrupted comparison. At --time-limit (or on SIGTERM/SIGINT) the running runs are asked to stop,
which makes each save a checkpoint and exit. After every run that ends, DIR/PLAN_NAME/ (the plan
file's name without .yaml) gets quality.json (every run: parameters, curves, final validation loss
and perplexity, or its error), quality.md (the tables: per run, and per configuration the mean and
spread over seeds) and quality.png (the validation loss curves, and the training loss smoothed).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from prism_megatron.launch.config import ConfigError, RunConfig, load_config
from prism_megatron.launch.metrics import METRICS_FILE, read_metrics

PROGRESS_SECONDS = 60
RUN_FILE = "run.json"
# Variables of a distributed launch: each run is a single process of its own.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PlanError(ValueError):
    """A plan that cannot be run; the message names the file and the key."""


@dataclasses.dataclass
class Configuration:
    name: str
    base: str
    overrides: list[str]


@dataclasses.dataclass
class Run:
    configuration: Configuration
    seed: int
    folder: Path
    overrides: list[str]
    config: RunConfig | None = None
    status: str = "pending"  # pending, running, finished, stopped, failed
    error: str = ""
    process: subprocess.Popen | None = None
    asked_to_stop: bool = False

    @property
    def label(self) -> str:
        return f"{self.configuration.name} seed {self.seed}"

    @property
    def metrics(self) -> list[dict]:
        path = self.folder / "tensorboard"
        return read_metrics(path) if (path / METRICS_FILE).exists() else []

    def finished(self) -> bool:
        steps = self.config.training.train_steps
        return any(r["step"] == steps and "val_loss" in r for r in self.metrics)

    @property
    def settings(self) -> dict:
        """What makes the run this run; kept in run.json with where and when it started."""
        return {"base": self.configuration.base, "overrides": self.configuration.overrides, "seed": self.seed}

    @property
    def record(self) -> dict | None:
        path = self.folder / RUN_FILE
        return json.loads(path.read_text()) if path.exists() else None


def read_plan(path: Path, extra: list[str], seeds: list[int] | None, only: list[str]) -> tuple[list[Configuration], list[int]]:
    try:
        plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{path}: cannot read the plan: {' '.join(str(e).split())}") from None

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise PlanError(f"{path}: {key}: {why}")

    require(isinstance(plan, dict), "the top level", "must be a mapping with base, seeds, set, configurations")
    unknown = set(plan) - {"base", "seeds", "set", "configurations"}
    require(not unknown, ", ".join(sorted(unknown)), "unknown key (known: base, seeds, set, configurations)")
    common = plan.get("set", [])
    require(isinstance(common, list) and all(isinstance(s, str) for s in common), "set", "must be a list of KEY=VALUE")
    seeds = seeds if seeds is not None else plan.get("seeds")
    require(isinstance(seeds, list) and len(seeds) > 0 and all(isinstance(s, int) for s in seeds), "seeds",
            "must be a non-empty list of integers")
    entries = plan.get("configurations")
    require(isinstance(entries, dict) and len(entries) > 0, "configurations", "must map names to {base, set}")
    configurations = []
    for name, entry in entries.items():
        key = f"configurations.{name}"
        require(isinstance(entry, dict) and set(entry) <= {"base", "set"}, key, "must be a mapping with base and/or set")
        base = entry.get("base", plan.get("base"))
        require(isinstance(base, str), key, "has no base config (give base in the plan or the configuration)")
        own = entry.get("set", [])
        require(isinstance(own, list) and all(isinstance(s, str) for s in own), f"{key}.set", "must be a list of KEY=VALUE")
        configurations.append(Configuration(str(name), base, [*common, *own, *extra]))
    missing = set(only) - {c.name for c in configurations}
    require(not missing, "configurations", f"--only names {sorted(missing)}, which the plan does not have")
    return [c for c in configurations if not only or c.name in only], seeds


def make_runs(configurations: list[Configuration], seeds: list[int], out: Path) -> list[Run]:
    """Seed by seed, so that a comparison cut short has as many seeds of every configuration."""
    runs = []
    for seed in seeds:
        for c in configurations:
            folder = out / "runs" / c.name / f"seed{seed}"
            overrides = [*c.overrides, f"training.seed={seed}", f"checkpoint.dir={json.dumps(str(folder / 'checkpoints'))}",
                         f"logging.tensorboard_dir={json.dumps(str(folder / 'tensorboard'))}"]
            run = Run(c, seed, folder, overrides)
            try:
                run.config = load_config(c.base, overrides)
            except ConfigError as e:
                run.status, run.error = "failed", str(e)
            record = run.record
            if record is not None and {k: record[k] for k in run.settings} != run.settings:
                run.status, run.error = "failed", (f"{folder} holds a run of other settings (its {RUN_FILE}): "
                                                   "remove it or choose another --out")
            runs.append(run)
    return runs


def start(run: Run, device: str | None) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    if run.record is None:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (run.folder / RUN_FILE).write_text(json.dumps({**run.settings, "device": hardware(device), "started": started}))
    command = [sys.executable, "-m", "prism_megatron.launch.train", "--config", run.configuration.base, "--resume"]
    for item in run.overrides:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with open(run.folder / "train.log", "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        run.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    run.status = "running"


def collect(run: Run) -> None:
    """A run's process has ended: finished, stopped (resumable) or failed, with its reason."""
    code = run.process.returncode
    run.process = None
    if run.finished():
        run.status = "finished"
        return
    lines = [line.strip() for line in (run.folder / "train.log").read_text(errors="replace").splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("prism-train: ")] or lines or ["no output"]
    # Asked to stop, it saved (exit code 75) or died before it could train: either way it resumes.
    run.status = "stopped" if code == 75 or run.asked_to_stop else "failed"
    run.error = f"exit code {code}: {reasons[-1]}"


def progress_line(run: Run) -> str:
    records = run.metrics
    step = max((r["step"] for r in records if "loss" in r), default=0)
    loss = [r["loss"] for r in records if "loss" in r]
    speed = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    return (f"  {run.label}: step {step}/{run.config.training.train_steps}"
            + (f", loss {loss[-1]:.4f}" if loss else "") + (f", {speed[-1]:,.0f} tokens/s" if speed else ""))


def summarize(run: Run) -> dict:
    records = run.metrics
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    params = [r["num_parameters"] for r in records if "num_parameters" in r]
    speed = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    final = val[-1][1] if run.status == "finished" else None
    t = run.config.training if run.config else None
    return {
        "configuration": run.configuration.name, "seed": run.seed, "status": run.status, "error": run.error or None,
        "num_parameters": params[-1] if params else None,
        "steps": max((r["step"] for r in records if "loss" in r), default=0),
        "train_steps": t.train_steps if t else None,
        "tokens_per_step": t.global_batch_size * run.config.data.seq_length if t else None,
        "val_loss": final, "perplexity": math.exp(final) if final is not None else None,
        "tokens_per_sec": statistics.median(speed) if speed else None,
        "val_curve": val,
        "train_curve": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "folder": str(run.folder),
        **{key: (run.record or {}).get(key) for key in ("device", "started")},
    }


def aggregate(configurations: list[Configuration], rows: list[dict]) -> list[dict]:
    result = []
    for c in configurations:
        losses = [r["val_loss"] for r in rows if r["configuration"] == c.name and r["val_loss"] is not None]
        params = [r["num_parameters"] for r in rows if r["configuration"] == c.name and r["num_parameters"]]
        mean = statistics.fmean(losses) if losses else None
        result.append({
            "configuration": c.name, "overrides": c.overrides, "base": c.base, "seeds": len(losses),
            "num_parameters": params[0] if params else None, "val_loss_mean": mean,
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else None,
            "val_loss_min": min(losses) if losses else None, "val_loss_max": max(losses) if losses else None,
            "perplexity_of_mean": math.exp(mean) if mean is not None else None,
        })
    return result


def hardware(device: str | None) -> str:
    """What a run on CUDA device `device` (None: the first, or the CPU) trains on."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(int(device or 0))
    return f"CPU ({os.cpu_count()} cores)"


def write_report(folder: Path, header: dict, configurations: list[Configuration], runs: list[Run]) -> None:
    """The tables and the plot; the device and dates are the runs' own (a report can be rewritten
    elsewhere from their folders)."""
    rows = [summarize(run) for run in runs]
    started = sorted(r["started"] for r in rows if r["started"])
    report = {**header, "device": ", ".join(sorted({r["device"] for r in rows if r["device"]})) or "none",
              "date": " to ".join(dict.fromkeys([started[0], started[-1]])) if started else "none",
              "runs": rows, "configurations": aggregate(configurations, rows)}
    (folder / "quality.json").write_text(json.dumps(report, indent=1))
    (folder / "quality.md").write_text(markdown(report))
    plot(report, folder / "quality.png")


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    lines = [f"command: `{report['command']}`", "", f"device: {report['device']}; runs started {report['date']}", "",
             "| configuration | seed | parameters | steps | tokens | val loss | perplexity | tokens/s | status |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["runs"]:
        tokens = r["steps"] * r["tokens_per_step"] if r["tokens_per_step"] else None
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        lines.append(f"| {r['configuration']} | {r['seed']} | {_num(r['num_parameters'], ',')} | "
                     f"{r['steps']}/{_num(r['train_steps'], 'd')} | {_num(tokens and tokens / 1e6, '.1f')}M | "
                     f"{_num(r['val_loss'], '.4f')} | {_num(r['perplexity'], '.2f')} | "
                     f"{_num(r['tokens_per_sec'], ',.0f')} | {status.replace('|', '/')} |")
    lines += ["", "| configuration | parameters | seeds | val loss mean | std over seeds | min – max | "
              "exp(mean) | overrides |", "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for c in report["configurations"]:
        overrides = " ".join(f"`{o}`" for o in c["overrides"])
        lines.append(f"| {c['configuration']} | {_num(c['num_parameters'], ',')} | {c['seeds']} | "
                     f"{_num(c['val_loss_mean'], '.4f')} | {_num(c['val_loss_std'], '.4f')} | "
                     f"{_num(c['val_loss_min'], '.4f')} – {_num(c['val_loss_max'], '.4f')} | "
                     f"{_num(c['perplexity_of_mean'], '.2f')} | {overrides} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {c["configuration"]: f"C{i % 10}" for i, c in enumerate(report["configurations"])}
    seeds = sorted({r["seed"] for r in report["runs"]})
    styles = ["-", "--", ":", "-."]
    for r in report["runs"]:
        if not r["val_curve"]:
            continue
        style = dict(color=colors[r["configuration"]], linestyle=styles[seeds.index(r["seed"]) % len(styles)],
                     label=f"{r['configuration']} seed {r['seed']}")
        to_tokens = r["tokens_per_step"] / 1e6
        steps, losses = zip(*r["val_curve"])
        val_ax.plot([s * to_tokens for s in steps], losses, marker="o", markersize=3, **style)
        if r["train_curve"]:
            steps, losses = zip(*r["train_curve"])
            window = max(1, len(losses) // 50)
            smooth = [statistics.fmean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
            train_ax.plot([s * to_tokens for s in steps], smooth, **style)
    finals = [r["val_loss"] for r in report["runs"] if r["val_loss"] is not None]
    if finals:  # the first evaluation (at initialisation) would squash the part that matters
        val_ax.set_ylim(min(finals) - 0.1, max(finals) + 0.6)
        train_ax.set_ylim(min(finals) - 0.3, max(finals) + 0.6)
    val_ax.set(title="validation loss", xlabel="tokens (M)", ylabel="loss")
    train_ax.set(title="training loss (running mean)", xlabel="tokens (M)")
    for ax in (val_ax, train_ax):
        ax.grid(alpha=0.3)
    if val_ax.lines:
        val_ax.legend(fontsize=8)
    fig.suptitle(f"{report['device']}, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(runs: list[Run], args: argparse.Namespace, report, started: float) -> None:
    """Train the pending runs, args.parallel at a time, calling report() whenever one ends, until all
    have ended or the time limit (or a signal) has stopped them."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
    slots: list[Run | None] = [None] * args.parallel
    pending = [run for run in runs if run.status == "pending"]
    last_progress, stopping = time.monotonic(), False
    while pending or any(slots):
        out_of_time = args.time_limit is not None and time.monotonic() - started > args.time_limit
        if (stop or out_of_time) and not stopping:
            print(f"{'time limit' if out_of_time else stop[0]}: {len(pending)} runs not started; "
                  "asking the running ones to save and stop", flush=True)
            pending, stopping = [], True
            for run in filter(None, slots):
                run.asked_to_stop = True
                run.process.send_signal(signal.SIGTERM)
        for i, run in enumerate(slots):
            if run is not None and run.process.poll() is not None:
                collect(run)
                tail = f"val loss {summarize(run)['val_loss']:.4f}" if run.status == "finished" else run.error
                print(f"{run.label}: {run.status}: {tail}", flush=True)
                report()
                slots[i] = None
            if slots[i] is None and pending:
                run = slots[i] = pending.pop(0)
                device = args.devices[i % len(args.devices)] if args.devices else None
                start(run, device)
                print(f"{run.label}: started{f' on device {device}' if device else ''} in {run.folder}", flush=True)
        if time.monotonic() - last_progress > PROGRESS_SECONDS and any(slots):
            lines = [progress_line(run) for run in slots if run is not None]
            print(f"[{time.monotonic() - started:,.0f} s]\n" + "\n".join(lines), flush=True)
            last_progress = time.monotonic()
        time.sleep(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", type=Path, help="the plan's YAML file")
    parser.add_argument("--out", type=Path, required=True, help="the comparison's folder (runs, tables, plot)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value in every configuration (repeatable)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="seeds instead of the plan's, e.g. 1,2,3")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="train only this configuration (repeatable)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--devices", type=lambda s: s.split(","), help="CUDA devices the parallel slots take in turn, e.g. 0,1")
    parser.add_argument("--time-limit", type=float, help="seconds after which running runs save and stop")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error("--time-limit must be > 0 (seconds)")
    started = time.monotonic()
    try:
        configurations, seeds = read_plan(args.plan, args.set, args.seeds, args.only)
    except PlanError as e:
        sys.exit(f"quality: error: {e}")
    reports = args.out / args.plan.stem
    reports.mkdir(parents=True, exist_ok=True)
    runs = make_runs(configurations, seeds, args.out)
    command = [Path(sys.executable).name, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    header = {"command": shlex.join(command), "plan": str(args.plan)}
    for run in runs:
        if run.status == "failed":
            print(f"{run.label}: not started: {run.error}", flush=True)
        elif run.finished():
            run.status = "finished"
            print(f"{run.label}: finished already ({run.folder})", flush=True)

    train(runs, args, lambda: write_report(reports, header, configurations, runs), started)
    write_report(reports, header, configurations, runs)
    done = sum(run.status == "finished" for run in runs)
    print(f"{done}/{len(runs)} runs finished; {reports / 'quality.md'}, {reports / 'quality.json'}, "
          f"{reports / 'quality.png'}", flush=True)
    if done < len(runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
