"""pipeline/locks.py with real processes: a holder in another process, refusals naming it, kill -9,
forked and exec'd children, a read-only mount, and a file system that refuses locks."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alexnet.pipeline import locks as L
from alexnet.pipeline.errors import AlexnetError

HOLDER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from alexnet.pipeline import locks as L
    directory, mode, child = sys.argv[1], sys.argv[2], sys.argv[3]
    with L.hold(directory, mode, "holder-command"):
        if child == "fork" and os.fork() == 0:
            time.sleep(60); os._exit(0)
        if child == "exec":
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("held", flush=True)
        time.sleep(60)
    """
)


def _holder(directory: Path, mode: str, child: str = "") -> subprocess.Popen:
    """A process holding ``directory``'s lock (in its own process group, children included)."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), mode, child or "-"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def _kill(p: subprocess.Popen, group: bool = False) -> None:
    if group:
        os.killpg(p.pid, signal.SIGKILL)
    else:
        p.kill()
    p.wait()


@pytest.fixture
def holder_cleanup():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.parametrize("held, wanted", [(L.EXCLUSIVE, L.EXCLUSIVE), (L.EXCLUSIVE, L.SHARED), (L.SHARED, L.EXCLUSIVE)])
def test_conflicting_lock_is_refused_naming_the_holder(tmp_path, holder_cleanup, held, wanted):
    p = _holder(tmp_path, held)
    holder_cleanup.append(p)
    with pytest.raises(L.LockBusy) as e, L.hold(tmp_path, wanted, "second-command"):
        pytest.fail("the second holder got the lock")
    msg = str(e.value)
    assert "\n" not in msg
    for piece in ("holder-command", f"pid {p.pid}", f"on {socket.gethostname()}", f"needs it {wanted}", "wait for it"):
        assert piece in msg, msg


def test_shared_holders_coexist_and_exclusive_waits_for_all(tmp_path, holder_cleanup):
    p = _holder(tmp_path, L.SHARED)
    holder_cleanup.append(p)
    with L.hold(tmp_path, L.SHARED, "reader-two"):
        pass
    _kill(p)
    with L.hold(tmp_path, L.EXCLUSIVE, "writer"):  # the reader's lock died with it
        assert [r["command"] for r in L.holders(tmp_path)] == []  # (its own record is not listed)
        assert '"writer"' in (tmp_path / L.LOCK_FILE).read_text()


@pytest.mark.parametrize("child", ["fork", "exec"])
def test_kill_9_of_holder_frees_the_lock_even_with_children_alive(tmp_path, holder_cleanup, child):
    p = _holder(tmp_path, L.EXCLUSIVE, child)
    holder_cleanup.append(p)
    _kill(p)  # the holder only; its child lives on in the process group
    assert subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True).stdout.strip(), "child should be alive"
    with L.hold(tmp_path, L.EXCLUSIVE, "after-the-kill"):
        assert L.holders(tmp_path) == []  # the dead holder's record is not named


def test_a_released_exclusive_lock_names_no_holder(tmp_path):
    with L.hold(tmp_path, L.EXCLUSIVE, "writer"):
        assert '"writer"' in (tmp_path / L.LOCK_FILE).read_text()
    assert (tmp_path / L.LOCK_FILE).read_text() == ""  # a reused pid could not make it name a finished run


def test_refusal_changes_nothing(tmp_path, holder_cleanup):
    holder_cleanup.append(_holder(tmp_path, L.EXCLUSIVE))
    before = (tmp_path / L.LOCK_FILE).read_bytes()
    with pytest.raises(L.LockBusy), L.hold(tmp_path, L.SHARED, "reader"):
        pass
    assert (tmp_path / L.LOCK_FILE).read_bytes() == before


@pytest.fixture
def read_only(tmp_path):
    """``tmp_path/ro``: a read-only bind mount of ``tmp_path/src`` (skips where mounts are not allowed)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot bind-mount: {r.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True)
        yield src, ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.mark.parametrize("with_lock_file", [True, False])
def test_shared_lock_on_a_read_only_mount(read_only, holder_cleanup, with_lock_file):
    """A reader needs no write access; a writer on the writable path still excludes it, and it the writer."""
    src, ro = read_only
    if with_lock_file:
        (src / L.LOCK_FILE).touch()
    with L.hold(ro, L.SHARED, "reader"):
        with pytest.raises(L.LockBusy), L.hold(src, L.EXCLUSIVE, "writer"):
            pass
    holder_cleanup.append(_holder(src, L.EXCLUSIVE))
    with pytest.raises(L.LockBusy, match="holder-command"), L.hold(ro, L.SHARED, "reader"):
        pass


def test_missing_directory_takes_no_lock_and_creates_nothing(tmp_path):
    with L.hold(tmp_path / "none", L.SHARED, "reader"):
        pass
    assert not (tmp_path / "none").exists()


def test_file_system_without_locks_refuses_or_warns(tmp_path, capsys):
    err = OSError(errno.ENOLCK, "No locks available")
    with pytest.raises(AlexnetError) as e:
        L.unsupported(tmp_path, err, "refuse")
    assert "ENOLCK" in str(e.value) and "ALEXNET_LOCKS=warn" in str(e.value) and "\n" not in str(e.value)
    L.unsupported(tmp_path, err, "warn")
    out = capsys.readouterr().err.strip()
    assert out.startswith("warning:") and "going on without a lock" in out and len(out.splitlines()) == 1
