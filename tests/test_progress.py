"""The progress entries a worker publishes: per-image index, steps, last norm and the norms since the last event."""
from __future__ import annotations

from service.progress import JobProgress


def norms(prog: JobProgress) -> list[list[float]]:
    return [e["norms"] for e in prog.event_images()]


def test_norms_since_the_last_event_then_the_tail_in_the_image_event():
    prog = JobProgress(2)
    for step, (a, b) in enumerate([(5.0, 7.0), (3.0, 6.0), (2.0, 4.0)], start=1):
        assert prog.update(0, step, a) and prog.update(1, step, b)
    assert prog.event_images() == [{"index": 0, "steps": 3, "grad_norm": 2.0, "norms": [5.0, 3.0, 2.0]},
                                   {"index": 1, "steps": 3, "grad_norm": 4.0, "norms": [7.0, 6.0, 4.0]}]
    prog.sent()
    prog.update(0, 4, 1.5)
    prog.update(1, 4, 3.5)
    prog.update(1, 4, 3.5)                         # a repeated report is not a new evaluation
    assert norms(prog) == [[1.5], [3.5]]
    prog.sent()
    # image 0 converges: one more evaluation below the threshold, no update (steps stay 4)
    assert prog.finish(0, 4, 0.25, stopped_early=True) == [0.25]
    prog.update(1, 5, 3.0)
    assert norms(prog) == [[], [3.0]]              # a finished image's norms go in its image event only
    prog.sent(0)
    prog.sent()
    prog.update(1, 6, 2.9)
    # image 1 reaches its step cap: the norm of its last update ends the tail
    assert prog.finish(1, 7, 2.75, stopped_early=False) == [2.9, 2.75]
    assert prog.summary() == [{"index": 0, "steps": 4, "grad_norm": 0.25}, {"index": 1, "steps": 7, "grad_norm": 2.75}]


def test_a_write_retried_after_a_failure_publishes_the_same_norms():
    prog = JobProgress(2)
    prog.update(0, 1, 4.0)
    prog.update(1, 1, 5.0)
    first = (prog.finish(0, 1, 0.5, stopped_early=True), prog.event_images())
    # the Redis write failed: nothing was marked sent, and the worker builds the same events again
    prog.update(1, 1, 5.0)
    assert (prog.finish(0, 1, 0.5, stopped_early=True), prog.event_images()) == first
    assert first[0] == [4.0, 0.5] and first[1][1]["norms"] == [5.0]
    prog.sent(0)
    prog.sent()
    assert norms(prog) == [[], []]


def test_unknown_index_and_missing_norms_are_ignored():
    prog = JobProgress(1)
    assert not prog.update(3, 1, 1.0)
    assert prog.finish(-1, 1, 1.0, stopped_early=False) == []
    prog.update(0, 1, None)                        # no norm yet (never stepped): nothing to plot
    assert prog.event_images() == [{"index": 0, "steps": 1, "grad_norm": None, "norms": []}]
    prog.update(0, 2, 1.23456789)
    assert norms(prog) == [[1.2346]]
    prog.sent()
    # a deadline stop reports the state already published: nothing new
    assert prog.finish(0, 2, 1.23456789, stopped_early=False) == []
    assert not prog.update(0, 3, 1.0)              # finished: later reports are ignored


def test_a_rerun_publishes_only_the_evaluations_an_earlier_run_did_not():
    """A job that runs again (worker lost) starts its images over: the evaluations its first run already
    published in the stream are left out, so each image's concatenated norms still number its steps."""
    import json

    from service.progress import published_norm_counts

    first = JobProgress(2)
    for step in range(1, 6):
        first.update(0, step, 3.0 - 0.1 * step)
        first.update(1, step, 4.0 - 0.1 * step)
    stream = [(b"1-0", {b"event": b"started", b"data": b"{}"}),
              (b"1-1", {b"event": b"progress", b"data": json.dumps({"images": first.event_images()}).encode()})]
    first.sent()
    first.update(0, 6, 2.3)                              # evaluated, never published: the worker died
    assert published_norm_counts(stream, 2) == [5, 5]

    rerun = JobProgress(2, published_norm_counts(stream, 2))
    for step in range(1, 9):
        rerun.update(0, step, 3.0 - 0.1 * step)
        rerun.update(1, step, 4.0 - 0.1 * step)
    progress = rerun.event_images()
    assert [len(e["norms"]) for e in progress] == [3, 3]             # evaluations 6, 7 and 8 only
    rerun.sent()
    # image 0 stops early at 8 steps: 5 + 3 published, then its last evaluation (steps + 1 norms in all)
    assert rerun.finish(0, 8, 2.2, stopped_early=True) == [2.2]
