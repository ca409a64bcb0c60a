"""One writer per workdir: an exclusive `flock` on `<workdir>/.lock`, taken before anything else
is written there.

Two runs started in the same workdir would otherwise interleave their checkpoints (and orbax's
retention would delete each other's). The lock belongs to the process: the OS releases it when
the process ends, however it ends (a `kill -9` leaves no stale lock), and the holder writes its
host name and PID into the file so that a second run can say who holds it.

Only process 0 of a multi-process run takes it (the others write nothing of their own). Object
storage (`gs://…`) has no `flock`: there the check is skipped with one warning.
"""

import fcntl
import json
import os
import socket
import threading
import time

from absl import logging

LOCK_NAME = ".lock"


class WorkdirLockError(RuntimeError):
    """Another process holds the workdir; the message names it."""


# realpath of the lock file -> [file descriptor, handles open in this process]. A process may
# take its own workdir again (a resumed train_and_evaluate in the same Python process): a second
# flock on a new descriptor would conflict with itself, so it shares the first one.
_held = {}
_held_guard = threading.Lock()


class WorkdirLock:
    """A handle on the lock; `release()` (or leaving the `with` block) gives it up, and the end
    of the process always does. `path` is None where no lock was taken."""

    def __init__(self, path):
        self.path = path

    def release(self):
        if self.path is None:
            return
        with _held_guard:
            entry = _held[self.path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self.path]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])
        self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def acquire(workdir, process_index=None):
    """Take `workdir` for this run, creating the folder; a WorkdirLock.

    Raises WorkdirLockError at once when another process holds it. process_index: this process's
    jax.process_index() (looked up when None); only process 0 locks.
    """
    workdir = os.fspath(workdir)
    if process_index is None:
        import jax  # Only here: the lock itself must not need jax (nor its start-up time).

        process_index = jax.process_index()
    if process_index != 0:
        return WorkdirLock(None)
    if "://" in workdir:
        logging.warning(
            "%s is on object storage, which cannot be locked: the check that no other run "
            "writes there is skipped.",
            workdir,
        )
        return WorkdirLock(None)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.realpath(os.path.join(workdir, LOCK_NAME))
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
        else:
            _held[path] = [_lock_file(path, workdir), 1]
    return WorkdirLock(path)


def _lock_file(path, workdir):
    """An open descriptor of `path` holding its exclusive flock, with this process recorded."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(os.pread(fd, 4096, 0))
        os.close(fd)
        raise WorkdirLockError(
            f"{workdir} is in use by another run ({holder}, lock file {path}). Stop that run "
            f"or give another --workdir."
        ) from None
    except OSError:
        os.close(fd)
        raise
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _describe_holder(content):
    try:
        record = json.loads(content)
        return f"PID {record['pid']} on host {record['host']}, since {record['since']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "a process that has not yet recorded its host and PID"


def _close_inherited_locks():
    """A forked child shares the parent's lock; closing its copies (without unlocking) lets
    the lock die with the parent even while children live on."""
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
