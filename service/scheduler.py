"""Which waiting samples enter the running batch, and which leave it: pure Python, no torch, no I/O.

The engine calls ``schedule(now)`` before every step and ``update(output, statuses)`` after it with
what the runner reported. The scheduler only counts places: ``capacity`` sample slots and
``max_rows`` model rows (a sample holds one row per condition, ``len(condition_rows(...))``); the
runner decides which slot and rows a sample gets.

Policy, in order:

1. Stops first: every sample of a cancelled job, and of a job whose deadline has passed, leaves
   before the step (``Stop.started`` says whether it held a slot). A sample with a zero step budget
   leaves as soon as its turn comes, without taking a slot.
2. Priorities: a job of higher ``priority`` is always served before one of lower priority.
3. Fairness: within one priority, jobs take turns one sample at a time (round-robin, in arrival
   order, the turn carried over between steps), so a 64-image job cannot starve a 1-image one.
4. No overtaking: when the sample whose turn it is does not fit in the free rows, admission stops
   for this step instead of letting smaller samples behind it take the rows; rows free up as
   running samples finish, so it enters within a few steps. Its job keeps the turn.

``static=True`` admits only into an empty batch: the baseline of ``bench/bench_engine.py`` (a batch
runs until its last sample stops, then the next one starts).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

STOP_REASONS = ("converged", "step_cap", "deadline", "cancelled")


@dataclass(frozen=True, order=True)
class SampleKey:
    """One image of one job."""

    job_id: str
    index: int


@dataclass(frozen=True)
class SampleRequest:
    key: SampleKey
    rows: int            # model rows it holds while running (>= 1)
    max_steps: int       # its step cap: telling "converged" from "step_cap" needs it


@dataclass
class JobRequest:
    job_id: str
    samples: list[SampleRequest]
    priority: int = 0                 # higher first
    deadline: float | None = None     # same clock as ``schedule(now)``


@dataclass(frozen=True)
class Stop:
    """A sample leaving before the step. ``started``: it held a slot (the runner frees it)."""

    key: SampleKey
    reason: str
    started: bool


@dataclass
class SchedulerOutput:
    stop: list[Stop] = field(default_factory=list)        # leave before this step
    admit: list[SampleKey] = field(default_factory=list)  # enter free slots this step
    run: list[SampleKey] = field(default_factory=list)    # stepped this step (running + admitted)
    rows: int = 0                                         # rows held by ``run``


@dataclass(frozen=True)
class SampleStatus:
    """What the runner reports for one stepped sample."""

    steps: int
    grad_norm: float
    finished: bool


@dataclass(frozen=True)
class Finished:
    """A sample that stopped by itself in the last step (below its threshold or at its cap)."""

    key: SampleKey
    reason: str          # "converged" or "step_cap"
    steps: int
    grad_norm: float


@dataclass
class _Job:
    request: JobRequest
    seq: int                                   # arrival order
    waiting: deque[SampleRequest]
    running: set[SampleKey] = field(default_factory=set)
    cancelled: bool = False


class Scheduler:
    """Slot and row accounting plus the admission policy of the module docstring."""

    def __init__(self, capacity: int, max_rows: int, static: bool = False):
        if capacity < 1 or max_rows < 1:
            raise ValueError("capacity and max_rows must be >= 1")
        self.capacity, self.max_rows, self.static = capacity, max_rows, static
        self._jobs: dict[str, _Job] = {}
        self._running: dict[SampleKey, SampleRequest] = {}   # insertion order = step order
        self._rows_in_use = 0
        self._seq = 0
        self._turn: dict[int, int] = {}    # priority -> seq of the job whose turn it is

    # -- input ----------------------------------------------------------------------------------
    def add_job(self, job: JobRequest) -> None:
        if job.job_id in self._jobs:
            raise ValueError(f"job {job.job_id} is already scheduled")
        for s in job.samples:
            if s.key.job_id != job.job_id:
                raise ValueError(f"sample {s.key} does not belong to job {job.job_id}")
            if not 1 <= s.rows <= self.max_rows:
                raise ValueError(f"a sample needs {s.rows} model rows; this worker has {self.max_rows}")
        self._jobs[job.job_id] = _Job(job, self._seq, deque(job.samples))
        self._seq += 1

    def cancel(self, job_id: str) -> bool:
        """Mark a job cancelled; its samples leave at the next ``schedule``. False if unknown."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancelled = True
        return True

    # -- state ----------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return sum(len(j.waiting) for j in self._jobs.values())

    @property
    def num_waiting_jobs(self) -> int:
        return sum(1 for j in self._jobs.values() if j.waiting)

    @property
    def rows_in_use(self) -> int:
        return self._rows_in_use

    @property
    def has_work(self) -> bool:
        return bool(self._jobs)

    def job_ids(self) -> list[str]:
        return list(self._jobs)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        for job in list(self._jobs.values()):
            reason = "cancelled" if job.cancelled else (
                "deadline" if job.request.deadline is not None and now >= job.request.deadline else None)
            if reason is not None:
                out.stop.extend(self._drop_job(job, reason))
        if not (self.static and self._running):
            self._admit(out)
        out.run = list(self._running)
        out.rows = self._rows_in_use
        return out

    def update(self, output: SchedulerOutput, statuses: Mapping[SampleKey, SampleStatus]) -> list[Finished]:
        """Take the runner's report for ``output.run``; returns the samples that finished.

        A sample may have no status yet (the runner's read-back can lag a step behind admission)."""
        finished = []
        for key in output.run:
            status = statuses.get(key)     # none yet for a sample whose first status read lags
            if status is None or not status.finished or key not in self._running:
                continue
            request = self._running[key]
            reason = "converged" if status.steps < request.max_steps else "step_cap"
            finished.append(Finished(key, reason, status.steps, status.grad_norm))
            self._leave(key)
        return finished

    # -- helpers --------------------------------------------------------------------------------
    def _admit(self, out: SchedulerOutput) -> None:
        for priority in sorted({j.request.priority for j in self._jobs.values()}, reverse=True):
            if self._admit_level(priority, out):
                return      # blocked: nothing of lower priority may overtake

    def _admit_level(self, priority: int, out: SchedulerOutput) -> bool:
        """Round-robin over the jobs of one priority; True when admission is blocked."""
        jobs = sorted((j for j in self._jobs.values() if j.request.priority == priority and j.waiting),
                      key=lambda j: j.seq)
        if not jobs:
            return False
        turn = self._turn.get(priority, 0)
        start = next((i for i, j in enumerate(jobs) if j.seq >= turn), 0)
        order = jobs[start:] + jobs[:start]
        while True:
            progressed = False
            for job in order:
                if not job.waiting:
                    continue
                sample = job.waiting[0]
                if sample.max_steps == 0:
                    # Nothing to evaluate: it leaves at once, holding no place.
                    job.waiting.popleft()
                    out.stop.append(Stop(sample.key, "step_cap", started=False))
                    self._forget_if_empty(job)
                    progressed = True
                    continue
                if len(self._running) >= self.capacity or self._rows_in_use + sample.rows > self.max_rows:
                    self._turn[priority] = job.seq
                    return True
                job.waiting.popleft()
                job.running.add(sample.key)
                self._running[sample.key] = sample
                self._rows_in_use += sample.rows
                out.admit.append(sample.key)
                self._turn[priority] = job.seq + 1      # the next job's turn
                progressed = True
            if not progressed:
                return False

    def _drop_job(self, job: _Job, reason: str) -> list[Stop]:
        stops = [Stop(key, reason, started=True) for key in self._running if key.job_id == job.request.job_id]
        for stop in stops:
            self._leave(stop.key)
        stops += [Stop(s.key, reason, started=False) for s in job.waiting]
        job.waiting.clear()
        self._jobs.pop(job.request.job_id, None)
        return stops

    def _leave(self, key: SampleKey) -> None:
        request = self._running.pop(key)
        self._rows_in_use -= request.rows
        job = self._jobs.get(key.job_id)
        if job is not None:
            job.running.discard(key)
            self._forget_if_empty(job)

    def _forget_if_empty(self, job: _Job) -> None:
        if not job.waiting and not job.running:
            self._jobs.pop(job.request.job_id, None)
