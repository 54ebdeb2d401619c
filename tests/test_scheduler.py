"""Scheduler alone: fabricated runner outputs in, admission / stop decisions out (no torch, no I/O)."""
from __future__ import annotations

import pytest

from service.scheduler import (JobRequest, SampleKey, SampleRequest, SampleStatus, Scheduler, SchedulerOutput,
                               Stop)


def job(job_id: str, n: int, rows: int = 1, max_steps: int = 100, priority: int = 0,
        deadline: float | None = None) -> JobRequest:
    samples = [SampleRequest(SampleKey(job_id, i), rows, max_steps) for i in range(n)]
    return JobRequest(job_id, samples, priority=priority, deadline=deadline)


def running(steps: int = 1, norm: float = 5.0) -> SampleStatus:
    return SampleStatus(steps=steps, grad_norm=norm, finished=False)


def step(s: Scheduler, now: float = 0.0, finished: dict[SampleKey, SampleStatus] | None = None):
    """One engine step with a fabricated runner: every stepped sample runs on unless listed in ``finished``."""
    out = s.schedule(now)
    statuses = {k: (finished or {}).get(k, running()) for k in out.run}
    return out, s.update(out, statuses)


def admitted(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(k.job_id, k.index) for k in out.admit]


def test_round_robin_keeps_a_small_job_from_starving():
    s = Scheduler(capacity=4, max_rows=12)
    s.add_job(job("big", 64))
    s.add_job(job("small", 1))
    out, _ = step(s)
    # The 1-image job gets a slot in the very first step, not after 64 images.
    assert admitted(out) == [("big", 0), ("small", 0), ("big", 1), ("big", 2)]
    assert s.num_running == 4 and s.num_waiting == 61


def test_turn_carries_over_between_steps():
    s = Scheduler(capacity=2, max_rows=10)
    for name in "abc":
        s.add_job(job(name, 3))
    out, _ = step(s)
    assert admitted(out) == [("a", 0), ("b", 0)]
    # Both finish; the next turn starts at c, not at a again.
    done = {k: SampleStatus(10, 0.1, True) for k in out.run}
    out, finished = step(s, finished=done)
    assert len(finished) == 2 and admitted(out) == []
    out, _ = step(s)
    assert admitted(out) == [("c", 0), ("a", 1)]


def test_higher_priority_first_even_when_later():
    s = Scheduler(capacity=2, max_rows=10)
    s.add_job(job("low", 3, priority=0))
    s.add_job(job("high", 3, priority=5))
    out, _ = step(s)
    assert admitted(out) == [("high", 0), ("high", 1)]
    done = {SampleKey("high", 0): SampleStatus(3, 0.1, True)}
    out, _ = step(s, finished=done)          # frees one slot at the end of this step
    out, _ = step(s)
    assert admitted(out) == [("high", 2)]


def test_row_budget_and_no_overtaking():
    s = Scheduler(capacity=4, max_rows=4)
    s.add_job(job("guided", 3, rows=3))      # e.g. a composition: [y1, y2, null]
    s.add_job(job("plain", 3, rows=1))
    out, _ = step(s)
    assert admitted(out) == [("guided", 0), ("plain", 0)]
    assert s.rows_in_use == 4
    # plain/0 finishes: one row is free, but it is guided's turn and it needs 3: nobody overtakes.
    out, _ = step(s, finished={SampleKey("plain", 0): SampleStatus(7, 0.1, True)})
    out, _ = step(s)
    assert admitted(out) == [] and s.rows_in_use == 3
    # guided/0 finishes: guided/1 enters first, then plain/1 with the last row.
    out, _ = step(s, finished={SampleKey("guided", 0): SampleStatus(9, 0.1, True)})
    out, _ = step(s)
    assert admitted(out) == [("guided", 1), ("plain", 1)]
    assert s.rows_in_use == 4


def test_update_tells_converged_from_step_cap_and_frees_the_budget():
    s = Scheduler(capacity=3, max_rows=6)
    s.add_job(job("j", 3, rows=2, max_steps=50))
    out, _ = step(s)
    assert s.rows_in_use == 6
    out = s.schedule(0.0)
    statuses = {SampleKey("j", 0): SampleStatus(17, 0.05, True),       # below its threshold early
                SampleKey("j", 1): SampleStatus(50, 3.0, True),        # ran into its cap
                SampleKey("j", 2): SampleStatus(12, 4.0, False)}
    finished = s.update(out, statuses)
    assert [(f.key.index, f.reason, f.steps) for f in finished] == [(0, "converged", 17), (1, "step_cap", 50)]
    assert s.num_running == 1 and s.rows_in_use == 2
    out, finished = step(s, finished={SampleKey("j", 2): SampleStatus(50, 1.0, True)})
    assert [f.reason for f in finished] == ["step_cap"]
    assert not s.has_work


def test_cancel_stops_running_and_waiting_samples():
    s = Scheduler(capacity=2, max_rows=4)
    s.add_job(job("a", 4))
    s.add_job(job("b", 1))
    step(s)
    assert s.cancel("a") and not s.cancel("nope")
    out, _ = step(s)
    stops = {(st.key.index, st.reason, st.started) for st in out.stop}
    assert stops == {(0, "cancelled", True), (1, "cancelled", False), (2, "cancelled", False),
                     (3, "cancelled", False)}
    assert [k.job_id for k in out.run] == ["b"]
    assert s.job_ids() == ["b"]


def test_deadline_stops_running_and_waiting_samples():
    s = Scheduler(capacity=1, max_rows=2)
    s.add_job(job("late", 2, deadline=10.0))
    s.add_job(job("free", 1))
    out, _ = step(s, now=0.0)
    assert admitted(out) == [("late", 0)]
    out, _ = step(s, now=10.0)
    assert out.stop == [Stop(SampleKey("late", 0), "deadline", True), Stop(SampleKey("late", 1), "deadline", False)]
    assert admitted(out) == [("free", 0)]


def test_zero_step_budget_leaves_without_a_slot():
    s = Scheduler(capacity=1, max_rows=1)
    s.add_job(job("none", 2, max_steps=0))
    out, _ = step(s)
    assert [(st.key.index, st.reason, st.started) for st in out.stop] == [(0, "step_cap", False), (1, "step_cap", False)]
    assert out.run == [] and not s.has_work


def test_static_mode_waits_for_the_whole_batch():
    s = Scheduler(capacity=2, max_rows=4, static=True)
    s.add_job(job("a", 4))
    out, _ = step(s, finished={})
    assert admitted(out) == [("a", 0), ("a", 1)]
    out, _ = step(s, finished={SampleKey("a", 0): SampleStatus(3, 0.1, True)})
    out, _ = step(s)
    assert admitted(out) == []                   # one slot is free, but a/1 still runs
    out, _ = step(s, finished={SampleKey("a", 1): SampleStatus(8, 0.1, True)})
    out, _ = step(s)
    assert admitted(out) == [("a", 2), ("a", 3)]


def test_rejects_a_sample_wider_than_the_row_budget():
    s = Scheduler(capacity=4, max_rows=2)
    with pytest.raises(ValueError, match="needs 3 model rows; this worker has 2"):
        s.add_job(job("wide", 1, rows=3))
    s.add_job(job("ok", 1, rows=2))
    with pytest.raises(ValueError, match="already scheduled"):
        s.add_job(job("ok", 1))


def test_shrinking_limits_lets_running_samples_drain():
    s = Scheduler(capacity=4, max_rows=8)
    s.add_job(job("a", 6, rows=2))
    step(s)
    assert s.num_running == 4
    s.max_rows = 4                                         # a smaller budget (e.g. after an out-of-memory)
    done = {SampleKey("a", 0): SampleStatus(5, 0.1, True)}
    step(s, finished=done)
    out, _ = step(s)
    assert admitted(out) == [] and s.rows_in_use == 6      # still above the new budget: no admission


def test_a_lagging_status_report_is_taken_a_step_later():
    """The runner may report nothing yet for a just-admitted sample (its read-back lags one step)."""
    s = Scheduler(capacity=2, max_rows=4)
    s.add_job(job("a", 2, max_steps=3))
    out = s.schedule(0.0)
    assert s.update(out, {}) == [] and s.num_running == 2           # no status yet: still running
    out = s.schedule(0.0)
    done = s.update(out, {out.run[0]: SampleStatus(3, 0.5, True)})
    assert [(f.key.index, f.reason, f.steps) for f in done] == [(0, "step_cap", 3)]
    assert s.num_running == 1
