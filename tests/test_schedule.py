"""The learning-rate schedules (§5's /10 drops): plateau and fixed epochs."""

from __future__ import annotations

import json
import math

import pytest

from alexnet.trainer import constants as TC
from alexnet.trainer.schedule import PlateauSchedule, StepSchedule


def test_plateau_schedule_divides_three_times_then_stops():
    s = PlateauSchedule(0.01, patience=2, min_delta=1e-3)
    errs = [0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    events = [s.observe(e) for e in errs]
    assert events == [None, None, None, "drop", None, None, "drop", None, "drop", None, "done", None]
    assert s.lr == pytest.approx(1e-5) and s.drops == TC.LR_DROPS and s.done
    # state round trip through plain values
    t = PlateauSchedule(0.01, patience=2)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.state_dict() == s.state_dict()


def test_plateau_schedule_small_improvement_is_not_improvement():
    s = PlateauSchedule(0.01, patience=1, min_delta=0.01)
    assert s.observe(0.5) is None
    assert s.observe(0.495) == "drop"  # improved by less than min_delta


def test_step_schedule():
    s = StepSchedule(0.01, milestones=(2, 4, 6, 8))
    lrs = [s.start_epoch(e) for e in range(9)]
    assert lrs == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5])  # at most 3 drops


def test_math_sanity():
    assert math.isclose(TC.BASE_LR * TC.LR_DROP_FACTOR**TC.LR_DROPS, 1e-5)
