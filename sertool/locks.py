"""One writer per output: an inter-process lock on a feature store, an experiment folder or a
predictions file, so that a second run on the same output is refused at once with the holder's
PID and host instead of silently mixing its rows or parts with the first run's.

    with OutputLock("feats/x/mfcc.h5", "extract", hint="wait for it or use another -o"):
        ...   # -> OutputBusy: another sertool extract (pid 123 on gpu1) is writing feats/x/mfcc.h5; ...

The lock is ``fcntl.flock`` on a hidden file beside the output (``.mfcc.h5.lock``; beside, not
inside, so that ``--overwrite`` may delete an experiment folder while holding its lock).  The
holder writes its PID, host, stage and start time into the file, which the refused run reads for
its message; the holder removes the file when it is done.

Why flock and not the ``filelock`` package: filelock's Unix lock is this same ``flock`` call, and
it does not say who holds a lock (it records no PID or host for the native lock, and truncates the
file when it opens it), which is the one thing the message needs; so the package would add a
dependency and a second file for the holder's record, and nothing else.  A flock lock belongs to
the open file and dies with the process: after a ``kill -9`` (or a crash, or a power cut) the
lock is free at once, so a stale lock is detected and taken over without guessing from PIDs.
The record it leaves says which run ended without releasing the lock; that is logged.  On NFS,
Linux maps flock to NFS byte-range locks, so two hosts see each other's locks too.

Where flock is not available (Windows, a file system without locks) the record alone is used:
a lock recorded by a live process on this host, or by any process on another host, is honoured;
one whose PID is no longer running here is stale and taken over (best effort: two runs starting
in the same instant may both proceed).  Where the lock file cannot be created at all (a read-only
folder) the run goes on without a lock: its first write fails with its own message.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import inspect
import json
import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["OutputBusy", "OutputLock", "lock_file_of", "locking", "read_holder"]

_CONTENDED = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}
_held: dict[str, "OutputLock"] = {}  # lock file -> the lock this process holds on it (re-entrant)


class OutputBusy(ValueError):
    """Another process is writing this output (one line naming its PID, host and what to do)."""


def lock_file_of(target: str | os.PathLike) -> Path:
    """The lock file of an output: ``DIR/.NAME.lock`` beside it (the folder's real path, so two
    spellings of one output share the lock)."""
    target = Path(os.path.abspath(target))
    return target.parent.resolve() / f".{target.name}.lock"


def read_holder(path: str | os.PathLike) -> dict | None:
    """The record of the process that holds (or last held) a lock file; None when there is none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return True
    return True


class OutputLock:
    """An exclusive lock on ``target`` for one ``stage`` (``extract``, ``train`` ...).

    ``acquire()`` raises :class:`OutputBusy` at once when another process holds it; ``release()``
    may be called any number of times.  Re-entrant within a process (a stage that calls another
    on the same output does not lock itself out)."""

    def __init__(
        self,
        target: str | os.PathLike,
        stage: str,
        *,
        hint: str = "wait for it or use another output",
        log: Callable[[str], None] | None = None,
    ):
        self.target = Path(target)
        self.stage = stage
        self.hint = hint
        self.log = log
        self.path = lock_file_of(self.target)
        self._fd: int | None = None
        self._owner: OutputLock | None = None  # the outer lock when re-entered
        self._depth, self._released = 0, False
        self.took_over: dict | None = None  # the record of a holder that ended without releasing

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> "OutputLock":
        if self._fd is not None or self._owner is not None:
            return self
        key = str(self.path)
        if key in _held:
            self._owner = _held[key]
            self._owner._depth += 1
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._lock_fd()
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.ENOTDIR, errno.EEXIST):
                return self  # cannot create the lock file: the run's own first write will say why
            raise
        self._fd, self._depth, self._released = fd, 1, False
        _held[key] = self
        if self.took_over and self.log is not None:
            t = self.took_over
            self.log(
                f"{self.target}: taking over from sertool {t.get('stage', '?')} (pid {t.get('pid')} on "
                f"{t.get('host')}), which ended without finishing"
            )
        return self

    def _lock_fd(self) -> int:
        """Open and lock the lock file, retrying when it was replaced in between; write our record."""
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._try_lock(fd):
                    os.close(fd)
                    raise self._busy()
                try:  # the holder before us removed (or replaced) the file after we opened it: retry
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = read_holder(self.path)
                if previous and previous.get("pid") is not None:
                    self.took_over = previous
                record = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "stage": self.stage,
                    "target": str(self.target),
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
                data = (json.dumps(record) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                return fd
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
        raise OutputBusy(f"{self.target}: cannot lock {self.path} (it keeps being replaced)")

    def _try_lock(self, fd: int) -> bool:
        """True when this process now holds the lock, False when another one does."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno in _CONTENDED:
                    return False
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # no flock here: trust the record (see the module docstring)
        holder = read_holder(self.path)
        if not holder or not isinstance(holder.get("pid"), int) or holder["pid"] == os.getpid():
            return True
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(holder["pid"])
        return False

    def _busy(self) -> OutputBusy:
        holder = None
        for _ in range(20):  # the holder may have locked the file and not yet written its record
            holder = read_holder(self.path)
            if holder:
                break
            time.sleep(0.025)
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
        stage = holder.get("stage", self.stage) if holder else self.stage
        return OutputBusy(f"another sertool {stage} ({who}) is writing {self.target}; {self.hint}")

    def release(self) -> None:
        if self._owner is not None:
            owner, self._owner = self._owner, None
            owner._leave()
        elif self._fd is not None and not self._released:
            self._released = True
            self._leave()

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth > 0 or self._fd is None:
            return
        _held.pop(str(self.path), None)
        try:  # remove the file while holding the lock; a waiter on the old file sees it gone and retries
            os.unlink(self.path)
        except OSError:
            pass
        try:
            os.close(self._fd)  # releases the flock
        finally:
            self._fd = None

    @property
    def held(self) -> bool:
        return (self._fd is not None and not self._released) or self._owner is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def locking(stage: str, targets: Callable[[dict], Iterable], hint: str = "wait for it or use another output"):
    """Decorator for a stage function: hold the locks of ``targets(arguments)`` (the bound
    arguments by name, defaults filled in) while it runs; the stage's ``log`` argument, when it
    has one, reports a lock taken over from a run that was killed."""

    def wrap(func):
        signature = inspect.signature(func)

        @functools.wraps(func)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with ExitStack() as stack:
                for target in targets(bound.arguments):
                    stack.enter_context(OutputLock(target, stage, hint=hint, log=bound.arguments.get("log")))
                return func(*args, **kwargs)

        return run

    return wrap
