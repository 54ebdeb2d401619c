"""The progress entries a worker publishes: per-image index, steps, last norm and the norms since the last event."""
from __future__ import annotations

from service.progress import JobProgress


def test_norms_since_the_last_event_then_the_tail_in_the_image_event():
    prog = JobProgress(2)
    for step, (a, b) in enumerate([(5.0, 7.0), (3.0, 6.0), (2.0, 4.0)], start=1):
        assert prog.update(0, step, a) and prog.update(1, step, b)
    first = prog.event_images()
    assert first == [{"index": 0, "steps": 3, "grad_norm": 2.0, "norms": [5.0, 3.0, 2.0]},
                     {"index": 1, "steps": 3, "grad_norm": 4.0, "norms": [7.0, 6.0, 4.0]}]
    prog.update(0, 4, 1.5)
    prog.update(1, 4, 3.5)
    prog.update(1, 4, 3.5)                         # a repeated read-back is not a new evaluation
    assert [e["norms"] for e in prog.event_images()] == [[1.5], [3.5]]
    # image 0 converges: one more evaluation below the threshold, no update (steps stay 4)
    assert prog.finish(0, 4, 0.25, stopped_early=True) == [0.25]
    prog.update(1, 5, 3.0)
    # image 1 reaches its step cap: the norm of its last update ends the tail
    assert prog.finish(1, 6, 2.75, stopped_early=False) == [3.0, 2.75]
    assert prog.summary() == [{"index": 0, "steps": 4, "grad_norm": 0.25}, {"index": 1, "steps": 6, "grad_norm": 2.75}]
    assert [e["norms"] for e in prog.event_images()] == [[], []]


def test_unknown_index_and_missing_norms_are_ignored():
    prog = JobProgress(1)
    assert not prog.update(3, 1, 1.0)
    assert prog.finish(-1, 1, 1.0, stopped_early=False) == []
    prog.update(0, 1, None)                        # no norm yet (never stepped): nothing to plot
    assert prog.event_images() == [{"index": 0, "steps": 1, "grad_norm": None, "norms": []}]
    # a deadline stop reports the state already published: nothing new
    prog.update(0, 2, 1.23456789)
    assert prog.event_images()[0]["norms"] == [1.2346]
    assert prog.finish(0, 2, 1.23456789, stopped_early=False) == []
