"""``run.max_minutes``: the trainer floor's wall-clock budget (the toy alignment bench runs every
method on one), counted over iterations only, kept in checkpoints, and continued by a second
``train()`` call with a larger budget."""

import json

import pytest


class FakeClock:
    """``time.perf_counter`` for ``trainers/base.py`` only: every call advances 5 s, so each
    iteration (timed between two calls) takes exactly 5 s of budget whatever the machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 5.0
        return self.now


def test_max_minutes_stops_resumes_and_continues(make_trainer, monkeypatch, tmp_path):
    import visalign.trainers.base as base

    clock = FakeClock()
    monkeypatch.setattr(base, "time", clock)
    t = make_trainer(run_dir="budget")
    t.run.iterations = 50
    t.run.max_minutes = 12 / 60  # 12 s: iterations of 5 s stop after the third (15 s >= 12 s)
    t.train()
    assert t.iteration == 3 and t.train_seconds == pytest.approx(15.0) and t.out_of_time
    rows = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert [r["time/train_total"] for r in rows] == pytest.approx([5.0, 10.0, 15.0])

    # the same budget again: nothing more to do
    t.train()
    assert t.iteration == 3

    # a fresh trainer resumes the clock from the checkpoint and stops at the new budget
    t2 = make_trainer(run_dir="budget")
    t2.run.iterations = 50
    t2.run.max_minutes = 22 / 60
    assert t2.resume() and t2.train_seconds == pytest.approx(15.0)
    t2.train()
    assert t2.iteration == 5 and t2.train_seconds == pytest.approx(25.0)
    rows = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]

    # without a budget, run.iterations alone bounds the run
    t2.run.max_minutes = None
    t2.train(iterations=6)
    assert t2.iteration == 6


def test_max_minutes_must_be_positive():
    from visalign.trainers import RunSettings

    with pytest.raises(ValueError, match="run.max_minutes must be > 0"):
        RunSettings(max_minutes=0)
    assert RunSettings(max_minutes=0.5).max_minutes == 0.5
