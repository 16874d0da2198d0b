"""tools/pool.py: every task runs once, each worker keeps one state, one progress bar, and a failure
is one line naming the task, whether a task raises, a worker dies, or it runs in this process."""

import os
import re

import pytest

from alexnet.pipeline.errors import AlexnetError
from alexnet.tools.pool import Pool, report


def _collect(task, state: list) -> int:
    state.append(task)
    report(task)
    return task * 10


def _fail_on_three(task, state) -> int:
    if task == 3:
        raise ValueError("record three is bad")
    return task


def _alexnet_error_on_three(task, state) -> int:
    if task == 3:
        raise AlexnetError("shard x: names its own item")
    return task


def _die_on_three(task, state) -> int:
    if task == 3:
        os._exit(3)
    return task


def _interrupted_on_three(task, state) -> int:
    if task == 3:
        raise KeyboardInterrupt  # a SIGINT sent to this worker alone: it stops without its result
    return task


@pytest.mark.parametrize("workers", [1, 2])
def test_each_task_runs_once_and_each_worker_keeps_one_state(workers, capsys):
    with Pool(workers, _collect, list) as pool:
        results = pool.run(range(20), bar={"total": sum(range(20)), "desc": "pool"})
        states = pool.states()
    assert sorted(results) == [10 * t for t in range(20)]
    assert len(states) == workers and sorted(t for s in states for t in s) == list(range(20))
    # one bar, moved by report() to its total, from the workers as from this process
    assert f"{sum(range(20))}/{sum(range(20))}" in capsys.readouterr().err


def test_tasks_are_made_when_dispatched_and_named_in_a_failure():
    made = []

    def prepare(t):
        made.append(t)
        return t

    with pytest.raises(AlexnetError, match=re.escape("item 3: ValueError: record three is bad; try again")):
        with Pool(1, _fail_on_three) as pool:
            pool.run([1, 2, 3, 4, 5], name=lambda t: f"item {t}", hint="try again", prepare=prepare)
    assert made == [1, 2, 3]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "fn, message",
    [
        (_fail_on_three, "task 3: ValueError: record three is bad; nothing written"),
        (_alexnet_error_on_three, "shard x: names its own item"),
    ],
)
def test_a_failing_task_is_one_line_naming_it(workers, fn, message):
    with pytest.raises(AlexnetError, match=f"^{re.escape(message)}$"):
        with Pool(workers, fn) as pool:
            pool.run(range(8), name=lambda t: f"task {t}", hint="nothing written")


@pytest.mark.parametrize(
    "fn, code", [(_die_on_three, 3), (_interrupted_on_three, 1)], ids=["os._exit", "KeyboardInterrupt"]
)
def test_a_dying_worker_is_one_line_naming_its_task(fn, code):
    message = f"task 3: its worker process died (exit code {code}; out of memory?); nothing written"
    with pytest.raises(AlexnetError, match=f"^{re.escape(message)}$"):
        with Pool(2, fn) as pool:
            pool.run(range(8), name=lambda t: f"task {t}", hint="nothing written")
    assert all(not p.is_alive() for p in pool.procs)
