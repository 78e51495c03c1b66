"""One run per checkpoint folder: a lock file naming its holder, kept fresh by a heartbeat, that
works on shared file systems where flock does not (it relies only on link() and rename() being
atomic, as they are on NFS and Lustre).

    lock = RunLock(cfg.checkpoint.dir, stale_after=cfg.training.fault_timeout)
    line = lock.acquire(patience)  # RunLockError naming a live holder; a line when it took over a dead one's
    ...
    lock.check()                   # RunLockError if another run has taken the folder over since
    lock.release()                 # also done at interpreter exit

`DIR/run.lock` holds the holder's host, pid, Slurm job id, start time and a token of its own; its
modification time is the heartbeat, which a thread refreshes every stale_after / 4 seconds (10 at
most). A lock belongs to its holder until the holder is gone: no heartbeat for longer than
`stale_after`, or, on the holder's own host, a pid that no longer exists. A run that finds such a
lock first claims the right to replace it by creating `DIR/run.lock.next.TOKEN` (TOKEN: the gone
holder's), which only one run can do; the claimant checks that the lock is still the one it judged
and renames its own over it. A claimant that is gone itself, before finishing, is succeeded the
same way, through `run.lock.next.` its own token.

A live holder is refused at once, except an earlier run of the Slurm job that this run is a
requeue of: it may still be finishing on a node that Slurm gave up on (declared down, and requeued
the job from). That one is waited for, up to `patience` seconds, to release the lock or go silent;
still alive after that, it is refused too.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from prism_megatron.files import disk_errors_named

log = logging.getLogger("prism-train")

LOCK_FILE = "run.lock"
# Create-or-take-over rounds before giving up: each round loses only to another run's progress.
_ATTEMPTS = 10


class RunLockError(RuntimeError):
    """The folder belongs to another run; the message names it."""


@dataclass
class Holder:
    """What a lock file says about the run holding it."""

    host: str
    pid: int
    job: str | None
    started: float
    token: str
    heartbeat: float  # the lock file's modification time
    inode: int

    def describe(self, now: float) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"host {self.host}, pid {self.pid}{job}, started {started}, "
                f"last heartbeat {now - self.heartbeat:.0f} s ago")


class RunLock:
    """The lock of one checkpoint folder, as one run holds it (see the module's docstring)."""

    def __init__(self, folder: str | os.PathLike, stale_after: float):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, patience: float = 0.0) -> str | None:
        """Hold the folder's lock, taking over one whose holder is gone (returning a line saying
        so); raise RunLockError naming a live holder, after waiting up to `patience` seconds for
        one that is an earlier run of this Slurm job."""
        with disk_errors_named(f"checkpoint.dir {self.folder}"):
            self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + patience
        took_over = None
        for _ in range(_ATTEMPTS):
            if self._create(self.path):
                break
            holder = self._read()
            if holder is None:  # released since: try again
                continue
            why = self._gone(holder, time.time())
            waited = ""
            if why is None and self._predecessor(holder):
                holder, why = self._wait(holder, deadline, patience)
                if holder is None:  # released or replaced while we waited: try again
                    continue
                waited = f"; still alive after {patience:.0f} s of waiting for this job's previous run to end"
            now = time.time()
            if why is None:
                raise RunLockError(f"checkpoint.dir {self.folder} is in use by another run ({holder.describe(now)}; "
                                   f"{self.path}){waited}: wait for it to end, or remove {self.path} if it is gone")
            if self._take_over(holder):
                took_over = (f"checkpoint.dir {self.folder}: took over the lock of a run that is gone "
                             f"({holder.describe(now)}): {why}")
                break
        else:
            raise RunLockError(f"checkpoint.dir {self.folder}: other runs keep taking {self.path}; "
                               "is more than one run starting in this folder?")
        self._held = True
        atexit.register(self.release)
        self._thread = threading.Thread(target=self._heartbeat, name="prism-run-lock", daemon=True)
        self._thread.start()
        return took_over

    def check(self) -> None:
        """Raise RunLockError if another run has taken the folder over (this one looked gone)."""
        if self.lost:
            raise RunLockError(self.lost)

    def release(self) -> None:
        """Give the folder up (a no-op when not held, or when another run has taken it over)."""
        atexit.unregister(self.release)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._held:
            self._held = False
            holder = self._read()
            if holder is not None and holder.token == self.token:
                self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------

    def _create(self, path: Path) -> bool:
        """Create `path` holding this run's record, whole or not at all: write a file of our own,
        then link it to that name, which fails if the name exists."""
        mine = self._write_record()
        try:
            os.link(mine, path)
            return True
        except FileExistsError:
            return False
        finally:
            mine.unlink(missing_ok=True)

    def _write_record(self) -> Path:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                  "started": time.time(), "token": self.token}
        mine = self.path.with_name(f"{LOCK_FILE}.{self.token}")
        try:
            with disk_errors_named(f"checkpoint.dir {self.folder}: cannot create {self.path}"):
                with open(mine, "x") as f:
                    json.dump(record, f)
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            mine.unlink(missing_ok=True)
            raise
        return mine

    def _read(self, path: Path | None = None) -> Holder | None:
        """Who holds the lock (or a claim on it, given its path); None if there is no such file. A
        file that does not parse (written by something else) is held by an unknown run, alive while
        its modification time is fresh."""
        try:
            with open(path or self.path) as f:
                stat = os.fstat(f.fileno())
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            return Holder(str(record["host"]), int(record["pid"]), record.get("job"), float(record["started"]),
                          str(record["token"]), stat.st_mtime, stat.st_ino)
        except (ValueError, KeyError, TypeError):
            return Holder("unknown", 0, None, stat.st_mtime, "", stat.st_mtime, stat.st_ino)

    def _gone(self, holder: Holder, now: float) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        if now - holder.heartbeat > self.stale_after:
            return (f"no heartbeat for {now - holder.heartbeat:.0f} s, longer than "
                    f"training.fault_timeout={self.stale_after:g}")
        if holder.host == socket.gethostname() and holder.pid > 0:
            # Our own pid on our host is an earlier process (a container, a rebooted node), not us.
            if holder.pid == os.getpid() or not _pid_exists(holder.pid):
                return f"pid {holder.pid} no longer exists on {holder.host}"
        return None

    def _predecessor(self, holder: Holder) -> bool:
        """Whether the holder is an earlier run of the Slurm job this run is a requeue of (two runs
        started by hand in one allocation share its job id too, but not as a restart)."""
        job = os.environ.get("SLURM_JOB_ID")
        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        return requeued and holder.job == job and holder.token != self.token

    def _wait(self, holder: Holder, deadline: float, patience: float) -> tuple[Holder | None, str | None]:
        """Watch a live holder until the deadline: (None, None) once its lock is released or
        replaced, (holder, why) once it is gone, (holder, None) if it is still alive."""
        if time.monotonic() < deadline:
            log.warning(f"prism-train: checkpoint.dir {self.folder} is still held by this job's previous run "
                        f"({holder.describe(time.time())}): waiting up to {patience:.0f} s for it to end")
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.stale_after / 4))
            now_held = self._read()
            if now_held is None or now_held.inode != holder.inode:
                return None, None
            holder = now_held
            why = self._gone(holder, time.time())
            if why is not None:
                return holder, why
        return holder, None

    def _take_over(self, judged: Holder) -> bool:
        """Replace the lock judged gone with this run's; False if another run is taking it over or
        has done so."""
        claims = []  # ours last, after those of claimants gone before finishing
        key = judged.token or f"inode-{judged.inode}"
        while True:
            claim = self.path.with_name(f"{LOCK_FILE}.next.{key}")
            if self._create(claim):
                claims.append(claim)
                break
            claimant = self._read(claim)
            if claimant is None:  # that claimant has finished or given up since: claim again
                continue
            if self._gone(claimant, time.time()) is None:
                # A live claimant finishes in moments: wait for that, leaving the claims alone
                # (they are what keeps the other runs out), then judge whatever holds the lock.
                said_so = time.monotonic() + 1.0
                while (still := self._read(claim)) is not None and still.inode == claimant.inode \
                        and self._gone(still, time.time()) is None:
                    if time.monotonic() > said_so:
                        said_so = math.inf
                        log.warning(f"prism-train: checkpoint.dir {self.folder}: another run "
                                    f"({claimant.describe(time.time())}) is taking over the lock of a run that is "
                                    f"gone ({claim}): waiting for it to finish, or up to "
                                    f"training.fault_timeout={self.stale_after:g} s")
                    time.sleep(min(0.1, self.stale_after / 4))
                return False
            claims.append(claim)
            key = claimant.token or f"inode-{claimant.inode}"
        try:
            current = self._read()
            if current is None or (current.token, current.inode) != (judged.token, judged.inode):
                return False
            os.rename(self._write_record(), self.path)
            return True
        finally:
            # The lock is no longer the one judged, for good (tokens are never reused), so a run
            # that makes one of these claims again will find that out and give up.
            for claim in claims:
                claim.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(10.0, self.stale_after / 4)):
            try:
                # Touch the file whose token is ours, never whatever now has the lock's name.
                with open(self.path) as f:
                    if _token(f.read()) == self.token:
                        os.utime(f.fileno())
                        continue
            except FileNotFoundError:
                pass
            except OSError:  # a passing error of a network file system: the next beat tries again
                continue
            holder = self._read()
            self.lost = (f"checkpoint.dir {self.folder}: another run has taken this folder over "
                         f"({holder.describe(time.time()) if holder else 'the lock is gone'}); this run "
                         "looked gone to it and must not write there any more")
            log.error(f"prism-train: {self.lost}")
            return


def _token(text: str) -> str | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record.get("token") if isinstance(record, dict) else None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
