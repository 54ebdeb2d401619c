"""Per-image progress of one running job, as the worker publishes it in ``progress`` and ``image`` events.

The engine reports every running sample's steps and gradient norm after each step, but a job's
``progress`` event goes out at most every ``progress_interval_s``. So that a client can still plot
each image's whole descent, every entry carries ``norms``: the gradient norms of the evaluations
made since the previous event, oldest first; the ``image`` event of a finished image carries the
rest, ending with its final norm. Concatenating an image's ``norms`` over its events, in order,
gives its gradient norm at every evaluation (the last one is below the threshold when it stopped
early). Entries also name their ``index`` (their position in ``images`` is the same).

A job that runs again (its worker died and another reclaimed it, or it went back to the queue) starts
its images over, so its first evaluations repeat ones whose norms an earlier run already published in
the same event stream: ``published_norm_counts`` counts those, and ``JobProgress`` leaves out that many
evaluations per image, so the concatenation still has ``steps`` (or ``steps + 1``) norms.

Norms stay here until the worker says they were written (``sent``), so a Redis write that fails and
is retried with the same step output publishes them again, not never. Only what was not yet
published is held, so a worker's memory does not grow with the steps.
"""
from __future__ import annotations

import json
from typing import Iterable, Sequence

NORM_DIGITS = 5          # significant digits of the norms in events (plots need no more)


def _rounded(value: float) -> float:
    return float(f"{value:.{NORM_DIGITS}g}")


class JobProgress:
    """Steps, last norm and unpublished norms of each image of one job."""

    def __init__(self, num_images: int, published: Sequence[int] = ()):
        self.images = [{"index": k, "steps": 0, "grad_norm": None} for k in range(num_images)]
        self._unsent: list[list[float]] = [[] for _ in range(num_images)]
        # evaluations made by this run, and how many an earlier run of the job already published
        self._evaluations = [0] * num_images
        self._published = [published[k] if k < len(published) else 0 for k in range(num_images)]
        self._finished: set[int] = set()
        self._previews: dict[int, str] = {}      # newest unpublished preview per running image

    def update(self, index: int, steps: int, grad_norm: float | None) -> bool:
        """A running image's state after a step; False for an index this job does not have (or finished)."""
        if not 0 <= index < len(self.images) or index in self._finished:
            return False
        entry = self.images[index]
        if grad_norm is not None and steps > entry["steps"]:      # a new evaluation (a repeated report is not)
            self._evaluated(index, grad_norm)
        entry["steps"], entry["grad_norm"] = steps, grad_norm
        return True

    def _evaluated(self, index: int, grad_norm: float) -> None:
        self._evaluations[index] += 1
        if self._evaluations[index] > self._published[index]:     # not a repeat of an earlier run's
            self._unsent[index].append(_rounded(grad_norm))

    def preview(self, index: int, data_url: str) -> None:
        """The newest preview of a running image (published with the next progress event)."""
        if 0 <= index < len(self.images) and index not in self._finished:
            self._previews[index] = data_url

    def finish(self, index: int, steps: int, grad_norm: float | None, stopped_early: bool) -> list[float]:
        """A finished image's final state; returns the norms of its ``image`` event, ending with the final one.

        A sample that stops below its threshold made one more evaluation without an update, so its
        steps stay the same while its norm is new. Repeating the call returns the same norms."""
        if not 0 <= index < len(self.images):
            return []
        entry = self.images[index]
        if index not in self._finished:
            self._finished.add(index)
            if grad_norm is not None and (steps > entry["steps"] or stopped_early):
                self._evaluated(index, grad_norm)
            entry["steps"], entry["grad_norm"] = steps, grad_norm
        return list(self._unsent[index])

    def event_images(self) -> list[dict]:
        """The ``images`` of a ``progress`` event: each entry with its norms not yet published (a
        finished image's go in its ``image`` event only)."""
        out = [{**entry, "norms": [] if k in self._finished else list(unsent)}
               for k, (entry, unsent) in enumerate(zip(self.images, self._unsent))]
        for k, url in self._previews.items():
            if k not in self._finished:
                out[k]["preview"] = url
        return out

    def sent(self, index: int | None = None) -> None:
        """The norms of image ``index`` (None: of every image, a progress event) are written."""
        for k in range(len(self.images)) if index is None else (index,):
            self._unsent[k] = []
            if index is None:
                self._previews.pop(k, None)

    def summary(self) -> list[dict]:
        """The job record's ``progress`` field: ``{"index", "steps", "grad_norm"}`` per image."""
        return [dict(entry) for entry in self.images]


def published_norm_counts(entries: Iterable[tuple[bytes, dict]], num_images: int) -> list[int]:
    """Norms per image already in a job's event stream (raw ``XRANGE`` entries), from its earlier runs."""
    counts = [0] * num_images
    for _, fields in entries:
        event = fields.get(b"event", b"").decode()
        if event not in ("progress", "image"):
            continue
        data = json.loads(fields[b"data"])
        for entry in data.get("images", []) if event == "progress" else [data]:
            index = entry.get("index")
            if isinstance(index, int) and 0 <= index < num_images:
                counts[index] += len(entry.get("norms") or [])
    return counts
