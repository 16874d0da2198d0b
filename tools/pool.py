"""The worker processes of alexnet-prep's long jobs (build-lmdb, pca-stats, verify), and their one progress bar.

    with Pool(workers, task_fn, make_state) as pool:       # forked here, before the caller lists its work
        results = pool.run(tasks, name=..., hint=..., bar=dict(total=n, unit="img"))
        states = pool.states()                             # each worker's state, once every task is done

Each worker has its own pipe (tasks go one way; progress, results and errors the other): no lock
is shared between processes, so the parent can kill them at any moment without a deadlock, and an
interrupted job resumes with the same command. A worker keeps one ``make_state()`` across all the
tasks it takes (pca-stats accumulates every image into one ``PixelMoments``) and runs
``task_fn(task, state)``; inside it, :func:`report` moves the bar. Tasks are handed out in the given
order, one at a time to each idle worker, so the caller orders them (largest first) and may make
each only when it is dispatched (``prepare``: build-lmdb's file lists).

A failure is one line naming the task: a task's :class:`AlexnetError` as it is (it names its item),
any other exception as ``"<task>: <Type>: <message>; <hint>"``, and a worker that dies as
``"<task>: its worker process died (exit code N; out of memory?); <hint>"``. One worker runs the
tasks in this process, with the same messages.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.connection import wait

from alexnet.pipeline.errors import AlexnetError

PROGRESS_EVERY = 16  # items per progress message (a pipe message costs ~10 us, an image ~0.3-2 ms)

_sink = None  # where report() goes: the pipe to the parent (a worker), or the bar (one worker, in this process)
_unreported = 0


def report(n: int = 1) -> None:
    """Count ``n`` more items done, from inside a task; sent every PROGRESS_EVERY items and at its end."""
    global _unreported
    _unreported += n
    if _unreported >= PROGRESS_EVERY:
        _flush()


def _flush() -> None:
    global _unreported
    if _sink is not None and _unreported:
        if callable(_sink):
            _sink(_unreported)
        else:
            _sink.send(("progress", _unreported))
    _unreported = 0


def _failure(name: str, typed: bool, text: str, hint: str) -> str:
    """The one line a task's failure becomes: an AlexnetError's text (it names its item), else the task named."""
    return text if typed else f"{name}: {text}" + (f"; {hint}" if hint else "")


def _described(e: Exception) -> tuple[bool, str]:
    return (True, str(e)) if isinstance(e, AlexnetError) else (False, f"{type(e).__name__}: {e}")


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _die_with_parent() -> None:
    """kill -9 of the parent takes this worker too: an orphan still writing would race a resumed job."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(conn, task_fn, make_state) -> None:
    """A worker: run the tasks the parent sends, until None; then send the state back and exit."""
    global _sink
    _sink = conn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    state = make_state() if make_state is not None else None
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            conn.send(("state", state))
            return
        try:
            result = task_fn(task, state)
        except Exception as e:  # sent with its type; the parent names the task
            _flush()
            conn.send(("error", _described(e)))
            continue
        _flush()
        conn.send(("done", result))


class Pool:
    """``workers`` processes, each with its own pipe; one worker: the tasks run in this process."""

    def __init__(self, workers: int, task_fn, make_state=None):
        self.task_fn, self.make_state = task_fn, make_state
        self.procs, self.conns = [], []
        self._state = None
        self._ended = False  # the workers were told to exit
        if workers <= 1:
            return
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        for _ in range(workers):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child_end, task_fn, make_state), daemon=True)
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.conns.append(parent_end)

    @property
    def size(self) -> int:
        return max(1, len(self.procs))

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()

    def run(self, tasks, *, name=str, hint: str = "", prepare=None, bar: dict | None = None) -> list:
        """Every task's result, in the order they finished; the first failure stops the job (AlexnetError).

        ``name(task)`` names a task in a failure, ``prepare(task)`` is what is sent (made at dispatch),
        ``bar``: tqdm's settings (``total``, ``unit``, ``desc``; ``disable`` for none).
        """
        from tqdm import tqdm

        prepare = prepare or (lambda t: t)
        settings = {"file": sys.stderr, "dynamic_ncols": True, "smoothing": 0.1, **(bar or {"disable": True})}
        with tqdm(**settings) as progress:
            if not self.procs:
                return self._run_here(list(tasks), name, hint, prepare, progress.update)
            return self._run_workers(list(tasks), name, hint, prepare, progress.update)

    def _run_here(self, tasks, name, hint, prepare, update) -> list:
        global _sink
        if self._state is None and self.make_state is not None:
            self._state = self.make_state()
        results, _sink = [], update
        try:
            for task in tasks:
                try:
                    results.append(self.task_fn(prepare(task), self._state))
                except Exception as e:
                    raise AlexnetError(_failure(name(task), *_described(e), hint)) from None
                _flush()
        finally:
            _sink = None
        return results

    def _run_workers(self, tasks, name, hint, prepare, update) -> list:
        results: list = []
        todo = tasks[::-1]  # popped from the end: in the given order
        idle = list(range(len(self.procs)))[::-1]
        busy: dict[int, object] = {}
        while todo or busy:
            while idle and todo:
                i, task = idle.pop(), todo.pop()
                self.conns[i].send(prepare(task))
                busy[i] = task
            conns = {self.conns[i]: i for i in busy}
            sentinels = {self.procs[i].sentinel: i for i in busy}
            for ready in wait([*conns, *sentinels], timeout=1.0):
                i = conns.get(ready, sentinels.get(ready))
                if i not in busy or (ready in sentinels and self.conns[i].poll()):
                    continue  # done already, or its last messages are still to be read
                if ready in sentinels:
                    raise AlexnetError(self._died(name(busy[i]), i, hint))
                try:
                    kind, payload = ready.recv()
                except EOFError:
                    raise AlexnetError(self._died(name(busy[i]), i, hint)) from None
                if kind == "progress":
                    update(payload)
                elif kind == "done":
                    results.append(payload)
                    del busy[i]
                    idle.append(i)
                else:
                    raise AlexnetError(_failure(name(busy[i]), *payload, hint))
        return results

    def _died(self, name: str, i: int, hint: str) -> str:
        self.procs[i].join(timeout=5)
        code = self.procs[i].exitcode
        return _failure(name, False, f"its worker process died (exit code {code}; out of memory?)", hint)

    def states(self) -> list:
        """Each worker's state (the tasks are done): the workers send it and exit."""
        if not self.procs:
            return [self._state if self._state is not None or self.make_state is None else self.make_state()]
        out, self._ended = [], True
        for i, conn in enumerate(self.conns):
            conn.send(None)
            while True:
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    raise AlexnetError(self._died("the end of the job", i, "")) from None
                if kind == "state":
                    out.append(payload)
                    break
        return out

    def close(self) -> None:
        """Normal end: ask each worker to exit."""
        for conn in self.conns if not self._ended else ():
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def kill(self) -> None:
        """Interruption or failure: stop now (an LMDB transaction in flight is simply not committed)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join()
