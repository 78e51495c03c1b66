"""One run per checkpoint folder: a lock file naming its holder, kept fresh by a heartbeat, that
works on shared file systems where flock does not (it relies only on link() and rename() being
atomic, as they are on NFS and Lustre).

    lock = RunLock(cfg.checkpoint.dir, stale_after=cfg.training.fault_timeout)
    line = lock.acquire()   # RunLockError naming a live holder; a line when it took over a dead one's
    ...
    lock.check()            # RunLockError if another run has taken the folder over since
    lock.release()          # also done at interpreter exit

`DIR/run.lock` holds the holder's host, pid, Slurm job id, start time and a token of its own; its
modification time is the heartbeat, which a thread refreshes every stale_after / 4 seconds (10 at
most). A lock belongs to its holder until the holder is gone: no heartbeat for longer than
`stale_after`, or, on the holder's own host, a pid that no longer exists. A run that finds such a
lock renames it aside (of several runs doing so at once, one rename succeeds; a run that moved a
lock fresher than the one it judged puts it back) and then creates its own.
"""
from __future__ import annotations

import atexit
import json
import logging
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

    def acquire(self) -> str | None:
        """Hold the folder's lock, taking over one whose holder is gone (returning a line saying
        so); raise RunLockError naming a live holder."""
        with disk_errors_named(f"checkpoint.dir {self.folder}"):
            self.folder.mkdir(parents=True, exist_ok=True)
        took_over = None
        for _ in range(_ATTEMPTS):
            if self._create():
                break
            holder = self._read()
            if holder is None:  # released or moved aside since: try again
                continue
            now = time.time()
            why = self._gone(holder, now)
            if why is None:
                raise RunLockError(f"checkpoint.dir {self.folder} is in use by another run ({holder.describe(now)}; "
                                   f"{self.path}): wait for it to end, or remove {self.path} if it is gone")
            if self._move_aside(holder):
                took_over = (f"checkpoint.dir {self.folder}: took over the lock of a run that is gone "
                             f"({holder.describe(now)}): {why}")
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

    def _create(self) -> bool:
        """Create the lock file whole or not at all: write a file of our own, then link it to the
        lock's name, which fails if that name exists."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                  "started": time.time(), "token": self.token}
        mine = self.path.with_name(f"{LOCK_FILE}.{self.token}")
        try:
            with disk_errors_named(f"checkpoint.dir {self.folder}: cannot create {self.path}"):
                with open(mine, "x") as f:
                    json.dump(record, f)
                    f.flush()
                    os.fsync(f.fileno())
            os.link(mine, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            mine.unlink(missing_ok=True)

    def _read(self) -> Holder | None:
        """The lock's holder; None if there is no lock file. A file that does not parse (written by
        something else) is held by an unknown run, alive while its modification time is fresh."""
        try:
            with open(self.path) as f:
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

    def _move_aside(self, judged: Holder) -> bool:
        """Rename the lock judged gone out of the way; False if another run got there first."""
        aside = self.path.with_name(f"{LOCK_FILE}.gone.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if os.stat(aside).st_ino != judged.inode:
            # Another run took the stale lock over between our read and our rename: give its
            # lock back (unless a third run has created one in the meantime).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        return True

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
