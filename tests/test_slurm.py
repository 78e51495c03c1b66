"""slurm/train.sbatch and slurm/prep.sbatch on a real Slurm that this module starts: munged,
slurmctld and two slurmd on this host acting as two nodes (n1, n2; one task each), CPU and gloo.

A 2-node job runs to the end; the same job preempted mid-run saves, requeues, resumes and
reproduces the uninterrupted run's losses step by step; a rank killed with SIGKILL ends the job
within training.fault_timeout, and the requeued job resumes from the last checkpoint; a job
requeued from a node that stopped answering, while its processes there still train, never writes
beside them: it waits, then refuses naming them; the prep array job plus its merge gives the store
of one `prism-prep tokenize`; the scaling harness runs over both nodes and writes its reports.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from prism_megatron.data_prep.store import TokenStore
from prism_megatron.process_groups import free_port
from test_train import losses, store, write_config  # noqa: F401  (store is a fixture)

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
STEPS = 30
DAEMONS = ("munged", "slurmctld", "slurmd")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment for Slurm commands (SLURM_CONF) of a 2-node cluster on this host."""
    search = f"{os.environ['PATH']}:/usr/sbin:/sbin"
    if not all(shutil.which(d, path=search) for d in DAEMONS):
        if os.environ.get("CI") == "true":
            pytest.fail("slurm-wlm and munge are not installed (.ci/run installs them)")
        pytest.skip("slurm-wlm and munge are not installed (apt-get install slurm-wlm munge)")
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool", "log"):
        (root / folder).mkdir()
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    ctld_port, d1_port, d2_port = free_port(), free_port(), free_port()
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=prismtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d1_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A requeued job may start again once its old credentials expired (cred_expire above, default 120 s);
# starting it earlier (scontrol update StartTime=now) kills it: "Job credential revoked".
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1_port} CPUs=2 RealMemory=4000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2_port} CPUs=2 RealMemory=4000
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{BIN}:{search}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([shutil.which("munged", path=search), f"--socket={root}/munge.sock", f"--pid-file={root}/munged.pid",
                    f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge.seed",
                    f"--key-file={key}", "--force"], check=True)
    subprocess.run([shutil.which("slurmctld", path=search), "-f", str(conf)], check=True, env=env)
    for node in ("n1", "n2"):
        subprocess.run([shutil.which("slurmd", path=search), "-f", str(conf), "-N", node], check=True, env=env)
    deadline = time.monotonic() + 60
    while "idle" not in sinfo(env):
        assert time.monotonic() < deadline, f"the test cluster did not come up: {sinfo(env)}"
        time.sleep(0.5)
    yield env
    for pid_file in ("n1.pid", "n2.pid", "slurmctld.pid", "munged.pid"):
        pid = int((root / pid_file).read_text())
        os.kill(pid, signal.SIGTERM)


def sinfo(env) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=env).stdout


def sbatch(env, *args, cwd) -> int:
    out = subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=cwd, check=True).stdout
    return int(out.strip().split(";")[0])


def job_field(env, job: int, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job), "-o"], capture_output=True, text=True,
                         env=env).stdout
    return re.search(rf"\b{name}=(\S+)", out).group(1)


def job_state(env, job: int) -> str:
    return job_field(env, job, "JobState")


def wait_for(what, check, timeout=300.0, every=0.2):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return found


def metrics_lines(folder: Path) -> list[dict]:
    """The records of the run's metrics.jsonl in the order written (read_metrics keeps only the
    latest of a step)."""
    path = folder / "tb" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_step(folder: Path) -> int:
    return max((record["step"] for record in metrics_lines(folder)), default=0)


def rank_process(config: Path, rank: int) -> psutil.Process:
    """The prism-train process of `rank` in a run of `config`."""
    return next(p for p in psutil.process_iter(["cmdline"])
                if str(config) in " ".join(p.info["cmdline"] or []) and "prism-train" in " ".join(p.info["cmdline"])
                and "torchrun" not in " ".join(p.info["cmdline"]) and p.environ().get("RANK") == str(rank))


def train_job(env, folder: Path, config: Path) -> int:
    return sbatch(env, "-N", 2, "--ntasks-per-node=1", "-J", "train", f"--output={folder}/job.out",
                  REPO / "slurm" / "train.sbatch", config, cwd=folder)


def job_config(folder: Path, store_path: str) -> Path:
    return write_config(folder, store_path, training={"train_steps": STEPS},
                        checkpoint={"save_interval": 1000}, logging={"eval_interval": 10})


@pytest.fixture(scope="module")
def reference(slurm, store, tmp_path_factory):
    """An uninterrupted 2-node run: its folder and its losses."""
    folder = tmp_path_factory.mktemp("reference")
    job = train_job(slurm, folder, job_config(folder, store))
    wait_for(f"job {job} to end", lambda: job_state(slurm, job) in ("COMPLETED", "FAILED"), timeout=600)
    return folder, job


def test_two_node_job_runs_to_the_end(slurm, reference):
    folder, job = reference
    log = (folder / "job.out").read_text()
    assert job_state(slurm, job) == "COMPLETED", log[-3000:]
    assert "2 nodes (n[1-2]) x 1 ranks" in log and "training finished" in log
    assert "2 ranks, dp 2" in log
    assert sorted(losses(folder)) == list(range(1, STEPS + 1))


def test_preempted_job_requeues_and_resumes_step_for_step(slurm, store, reference, tmp_path):
    job = train_job(slurm, tmp_path, job_config(tmp_path, store))
    wait_for("a few steps", lambda: last_step(tmp_path) >= 5)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, env=slurm)
    wait_for("the requeue", lambda: "requeueing" in (tmp_path / "job.out").read_text())
    saved = time.monotonic()
    wait_for("the resumed run's first step", lambda: re.search(r"resumed from .*\n(.*\n)*step +\d+/",
                                                               (tmp_path / "job.out").read_text()))
    training_again = time.monotonic()
    wait_for(f"job {job} to end", lambda: job_state(slurm, job) in ("COMPLETED", "FAILED"), timeout=600)
    log = (tmp_path / "job.out").read_text()
    assert job_state(slurm, job) == "COMPLETED", log[-3000:]
    print(f"preemption: signal to requeue {saved - signalled:.1f} s, signal to training again "
          f"{training_again - signalled:.1f} s")
    assert "got SIGUSR1" in log and "stop requested (stop file" in log
    assert re.search(r"saved checkpoint .*step_000000\d\d in [\d.]+ s", log)
    stopped_at = int(re.search(r"resumed from \S+step_(\d+)", log).group(1))
    assert 5 <= stopped_at < STEPS and "restart 1:" in log and "training finished" in log
    reference_losses, resumed = losses(reference[0]), losses(tmp_path)
    assert sorted(resumed) == sorted(reference_losses)
    for step in sorted(reference_losses):
        assert resumed[step] == reference_losses[step], f"step {step}"


def test_killed_rank_ends_the_job_and_the_requeue_resumes(slurm, store, reference, tmp_path):
    fault_timeout = 60
    config = write_config(tmp_path, store, training={"train_steps": STEPS, "fault_timeout": fault_timeout},
                          checkpoint={"save_interval": 4}, logging={"eval_interval": 10})
    job = train_job(slurm, tmp_path, config)
    wait_for("a checkpoint and a few steps", lambda: last_step(tmp_path) >= 6)
    rank_process(config, 1).kill()
    killed = time.monotonic()
    wait_for("the failure", lambda: "training failed" in (tmp_path / "job.out").read_text(),
             timeout=fault_timeout + 30)
    # The bound the configuration promises, not a performance figure.
    assert time.monotonic() - killed < fault_timeout
    wait_for(f"job {job} to end", lambda: job_state(slurm, job) in ("COMPLETED", "FAILED"), timeout=600)
    log = (tmp_path / "job.out").read_text()
    assert job_state(slurm, job) == "COMPLETED", log[-3000:]
    assert re.search(r"training failed \(srun exit [1-9]\d* after \d+ s; failure 1 of 3\): requeueing", log)
    assert re.search(r"restart 1: .*\n(.*\n)*resumed from \S+step_000000(04|08|12)", log)
    reference_losses, resumed = losses(reference[0]), losses(tmp_path)
    for step in sorted(reference_losses):
        assert resumed[step] == reference_losses[step], f"step {step}"


def test_requeued_job_never_writes_beside_a_predecessor_still_running(slurm, store, tmp_path):
    """A node that stops answering is declared down and its job requeued, with nobody knowing
    whether the job's processes there have ended: here they have not, and keep training into the
    folder. The requeued run waits for them (a bounded time), then refuses naming them; it writes
    nothing, and the job is not requeued again.

    The node stops answering for real (its slurmd is frozen, so the kill Slurm sends never arrives)
    and is marked down with scontrol, as slurmctld would do itself after SlurmdTimeout (300 s)."""
    fault_timeout = 60
    config = write_config(tmp_path, store, training={"train_steps": 100_000, "fault_timeout": fault_timeout},
                          checkpoint={"save_interval": 5}, logging={"eval_interval": 100_000})
    job = sbatch(slurm, "-N", 1, "-J", "train", f"--output={tmp_path}/job.out", REPO / "slurm" / "train.sbatch",
                 config, cwd=tmp_path)
    wait_for("a checkpoint and a few steps", lambda: last_step(tmp_path) >= 7)
    node = job_field(slurm, job, "BatchHost")
    predecessor = rank_process(config, 0)
    slurmd = int((Path(slurm["SLURM_CONF"]).parent / f"{node}.pid").read_text())
    os.kill(slurmd, signal.SIGSTOP)
    try:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=not responding"],
                       check=True, env=slurm)
        wait_for("the requeued job to wait", lambda: "waiting up to" in (tmp_path / "job.out").read_text(),
                 timeout=300)
        step_when_waiting = last_step(tmp_path)
        wait_for(f"job {job} to end", lambda: job_state(slurm, job) == "FAILED", timeout=300)
        log = (tmp_path / "job.out").read_text()
        # Only the predecessor wrote: a second writer would have gone on from a checkpoint (or from
        # scratch), logging steps already logged.
        steps = [record["step"] for record in metrics_lines(tmp_path) if "loss" in record]
        assert all(a < b for a, b in zip(steps, steps[1:])), \
            f"steps logged again: {[(a, b) for a, b in zip(steps, steps[1:]) if a >= b][:5]}"
        assert "resumed from" not in log
        # ... and went on writing all along.
        assert predecessor.is_running() and last_step(tmp_path) > step_when_waiting, log[-3000:]
        assert json.loads((tmp_path / "ckpt" / "run.lock").read_text())["pid"] == predecessor.pid
        holder = f"host {socket.gethostname()}, pid {predecessor.pid}, Slurm job {job}"
        patience = 45  # fault_timeout less min(30 s, a quarter of it)
        assert f"still held by this job's previous run ({holder}" in log
        assert f"waiting up to {patience} s for it to end" in log
        refusals = [line for line in log.splitlines() if line.startswith("prism-train: error:")]
        assert len(refusals) == 1, log[-3000:]
        assert f"is in use by another run ({holder}" in refusals[0]
        assert f"still alive after {patience} s of waiting" in refusals[0]
        assert "restart 1: training stopped with exit code 1: checkpoint.dir" in log and "; not requeued" in log
    finally:
        kill_job_processes(job)
        os.kill(slurmd, signal.SIGCONT)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=slurm)
        wait_for("both nodes to be idle again", lambda: sinfo(slurm).split() == ["idle", "2"], timeout=120)


def kill_job_processes(job: int) -> None:
    """SIGKILL every process of `job` still on this host, each stopped first so that none reacts to
    another's end (a batch shell whose srun ends requeues the job)."""
    steps = [p for p in psutil.process_iter(["cmdline"])
             if " ".join(p.info["cmdline"] or []).startswith(f"slurmstepd: [{job}.")]
    processes = [q for p in steps for q in [p, *p.children(recursive=True)]]
    for stop in (psutil.Process.suspend, psutil.Process.kill):
        for process in processes:
            try:
                stop(process)
            except psutil.NoSuchProcess:
                pass


def test_prep_array_and_merge_make_the_store_of_one_tokenize(slurm, tmp_path):
    from test_data_tokenize import stdlib_documents, write_jsonl

    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, stdlib_documents(300_000))
    from prism_megatron.data_prep.tokenizer import train_tokenizer
    tok = train_tokenizer([str(corpus)], str(tmp_path / "tok.model"), 512, sample_lines=5000, seed=0)
    options = ["--shard-size-mb", "0.05"]
    subprocess.run([BIN / "prism-prep", "tokenize", corpus, "--tokenizer", tok, "--output",
                    tmp_path / "single", "--workers", "1", *options], check=True, capture_output=True, env=slurm)
    out = subprocess.run(["bash", REPO / "slurm" / "prep.sbatch", "3", tmp_path / "merged", tok, corpus, *options],
                         check=True, capture_output=True, text=True, env=slurm, cwd=tmp_path).stdout
    array, merge = map(int, re.fullmatch(r"tokenize: array job (\d+) \(3 tasks\); merge: job (\d+) \(afterok\)\n",
                                         out).groups())
    wait_for(f"merge job {merge}", lambda: job_state(slurm, merge) in ("COMPLETED", "FAILED", "CANCELLED"))
    assert job_state(slurm, merge) == "COMPLETED", (tmp_path / f"prism-prep-merge-{merge}.out").read_text()
    single, merged = TokenStore.open(tmp_path / "single"), TokenStore.open(tmp_path / "merged")
    assert len(single.shards) >= 3 and len(merged.shards) == len(single.shards)
    assert [(s.num_documents, s.num_tokens, s.sha256) for s in merged.shards] == \
        [(s.num_documents, s.num_tokens, s.sha256) for s in single.shards]
    assert merged.num_tokens == single.num_tokens


def test_scaling_harness_runs_on_two_nodes(slurm, tmp_path):
    from test_scaling import TINY, check_reports, progress_lines

    # Submitted from the checkout, as a user does (the script finds the harness there).
    job = sbatch(slurm, "-N", 2, "--ntasks-per-node=1", f"--output={tmp_path}/job.out", REPO / "slurm" / "scaling.sbatch",
                 tmp_path / "out", *TINY, "--cases", "kernel", "model", "--layouts", "cp2", "--seq-lengths", "32",
                 cwd=REPO)
    wait_for(f"job {job} to end", lambda: job_state(slurm, job) in ("COMPLETED", "FAILED"))
    log = (tmp_path / "job.out").read_text()
    assert job_state(slurm, job) == "COMPLETED", log[-3000:]
    assert "2 nodes (n[1-2]) x 1 ranks" in log and "harness ended with exit code 0" in log
    results = check_reports(tmp_path / "out", rows=2)
    assert results["gpus"] == 2 and len(progress_lines(log)) == 2
    assert [(row["case"], row["layout"], "error" in row) for row in results["rows"]] == \
        [("kernel", "tp1cp2dp1", False), ("model", "tp1cp2dp1", False)]
