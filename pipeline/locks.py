"""Directory locks: who may write a data or run directory while others read or write it.

    with hold(data_dir, EXCLUSIVE, "alexnet-prep build-lmdb"):   # refused with one line if anyone holds it
        ...
    with hold(data_dir, SHARED, "alexnet-train"):                # many readers at once; no writer meanwhile
        ...

Rules (README, "Locks"): a data directory is held exclusively while ``build-lmdb`` or ``pca-stats``
writes it and shared while training, ``eval``, ``verify`` or ``preview`` read it; a run directory is
held exclusively by the run that trains in it (rank 0 for a multi-node job); ``report``, ``eval`` and
``predict`` only read a run directory and take no lock. A refused command exits with one line
naming the holder (command, process id, host, since when) and what to do, having changed nothing.

Mechanism: ``flock(2)`` on ``DIR/.alexnet.lock``, so a lock dies with the process that holds it (kill -9
leaves nothing stale: the kernel drops it when the last descriptor closes). The descriptor is opened
close-on-exec, and a process forked while holding one closes its copy at once (``os.register_at_fork``),
so worker processes never keep a lock alive after their parent is gone.

The lock file also carries the holders' records, one JSON line each (``command``, ``pid``, ``host``,
``since``): an exclusive holder truncates the file and writes its own; a shared holder appends its
line. The records only name holders for a refusal; the lock itself is the flock. Lines of processes
on this host that are no longer alive are left out of a refusal.

Read-only data: a shared lock needs no write access. The lock file is opened read-only where it
cannot be opened for writing (a read-only mount, a dataset owned by another user); where it does not
exist and cannot be created, the directory itself is locked, which writers lock too.

Network file systems: on NFS (v3 with lockd, v4 natively) Linux emulates flock with POSIX byte-range
locks, which the server keeps across clients; a client that dies holds its locks until the server's
lease expires (v4: 90 s by default). Lustre grants flock across clients only when mounted with
``-o flock`` (``-o localflock`` makes locks local to each client, so two nodes can both "hold" one);
without either option flock fails with ENOSYS. A file system that refuses a lock (ENOLCK, ENOSYS,
EOPNOTSUPP) gets one line; with ``ALEXNET_LOCKS=warn`` in the environment the command goes on
without the lock and says so instead of refusing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import AlexnetError

LOCK_FILE = ".alexnet.lock"
SHARED, EXCLUSIVE = "shared", "exclusive"
LOCKS_ENV = "ALEXNET_LOCKS"  # "refuse" (default) or "warn": what to do where the file system has no locks
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
MAX_RECORDS_BYTES = 64 << 10  # shared holders stop adding records beyond this (the next writer truncates)

_HELD: set[int] = set()  # descriptors this process holds locks through (closed in forked children)


def _close_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockBusy(AlexnetError):
    """Another process holds the directory's lock in a conflicting mode."""


def _record(command: str) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": since})


def _alive(rec: dict) -> bool:
    """False only for a process of this host that is gone; others' hosts cannot be asked."""
    if rec.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(rec.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OSError):
        return True
    return True


def holders(directory: Path) -> list[dict]:
    """The records in the directory's lock file whose processes may still be alive (newest last)."""
    try:
        lines = (Path(directory) / LOCK_FILE).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and _alive(rec) and rec.get("pid") != os.getpid():
            out.append(rec)
    return out


def describe(rec: dict) -> str:
    return f"{rec.get('command', '?')} (pid {rec.get('pid', '?')} on {rec.get('host', '?')}, since {rec.get('since', '?')})"


def _open(directory: Path, mode: str) -> tuple[int, bool]:
    """A descriptor to lock: the lock file (read-write, created if need be), else for a shared lock the
    lock file read-only, else the directory itself. Returns (fd, whether records can be written)."""
    path = Path(directory) / LOCK_FILE
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_RDWR | os.O_CREAT, 0o666), True
    except OSError as e:
        if mode == EXCLUSIVE or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    try:
        return os.open(path, flags | os.O_RDONLY), False
    except FileNotFoundError:
        return os.open(directory, os.O_CLOEXEC | os.O_RDONLY | os.O_DIRECTORY), False


def _flock(fd: int, mode: str) -> bool:
    """True if the lock was taken; False if another process holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if mode == EXCLUSIVE else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _dir_lock(directory: Path) -> int | None:
    """A writer also locks the directory, so that readers who could only lock the directory (no lock
    file on a read-only path) see it. None where someone holds it (the caller refuses)."""
    fd = os.open(directory, os.O_CLOEXEC | os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _flock(fd, EXCLUSIVE):
            return fd
    except OSError:  # a file system without directory locks: the lock file alone
        return fd
    os.close(fd)
    return None


def unsupported(directory: Path, err: OSError, policy: str | None = None) -> None:
    """The file system refused a lock: one line, raised, or (``ALEXNET_LOCKS=warn``) printed as a warning."""
    policy = (policy or os.environ.get(LOCKS_ENV, "refuse")).strip().lower()
    what = f"the file system of {directory} does not support locks ({errno.errorcode.get(err.errno, err.errno)})"
    if policy == "warn":
        print(f"warning: {what}; going on without a lock ({LOCKS_ENV}=warn)", file=sys.stderr, flush=True)
        return
    raise AlexnetError(
        f"{what}: mount it with locking (NFS: lockd or v4; Lustre: -o flock), or set {LOCKS_ENV}=warn "
        "to go on without one (README: Locks)"
    )


def _refusal(directory: Path, mode: str, command: str) -> LockBusy:
    found = holders(directory)
    named = "; ".join(describe(r) for r in found[-3:]) if found else "another process (its record is not written yet)"
    if mode == EXCLUSIVE:
        fix = "wait for it to finish, or stop it, then run the same command again"
    else:
        fix = "wait for it to finish (a reader cannot use a directory while it is being written)"
    return LockBusy(f"{directory} is in use by {named}: {command} needs it {mode}; {fix}")


def _write_record(fd: int, mode: str, command: str) -> None:
    line = (_record(command) + "\n").encode()
    if mode == EXCLUSIVE:
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
    elif os.fstat(fd).st_size < MAX_RECORDS_BYTES:
        os.lseek(fd, 0, os.SEEK_END)  # appends of one short line do not interleave with other readers'
        os.write(fd, line)


@contextlib.contextmanager
def hold(directory: Path, mode: str, command: str, *, policy: str | None = None) -> Iterator[None]:
    """Hold ``directory``'s lock in ``mode`` (SHARED or EXCLUSIVE) for the ``with`` block; raises
    :class:`LockBusy` (one line naming the holder) at once if another process holds it in a conflicting mode."""
    directory = Path(directory)
    created = mode == EXCLUSIVE and not directory.exists()
    if created:
        directory.mkdir(parents=True)
    elif not directory.is_dir():  # nothing to read there: the command says so in its own words
        yield
        return
    fds: list[int] = []
    try:
        fd, writable = _open(directory, mode)
        fds.append(fd)
        try:
            taken = _flock(fd, mode)
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            unsupported(directory, e, policy)
            fds.clear()
            os.close(fd)
            yield
            return
        if not taken:
            raise _refusal(directory, mode, command)
        if mode == EXCLUSIVE:
            dfd = _dir_lock(directory)
            if dfd is None:
                raise _refusal(directory, mode, command)
            fds.append(dfd)
        _HELD.update(fds)
        if writable:
            _write_record(fd, mode, command)
        try:
            yield
        finally:
            if writable and mode == EXCLUSIVE:  # a finished holder is named by no later refusal
                os.ftruncate(fd, 0)
    except BaseException:
        if created:  # a command that failed leaves no directory it made for nothing
            _remove_if_only_lock(directory)
        raise
    finally:
        for fd in fds:
            _HELD.discard(fd)
            os.close(fd)


def _remove_if_only_lock(directory: Path) -> None:
    with contextlib.suppress(OSError):
        if [p.name for p in directory.iterdir()] in ([], [LOCK_FILE]):
            (directory / LOCK_FILE).unlink(missing_ok=True)
            directory.rmdir()
