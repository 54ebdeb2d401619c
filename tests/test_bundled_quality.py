"""The bundled models at their recorded defaults, judged by distribution (``models/judge.py``).

Bars from the NFE-quality frontier: ``digits`` near the real-vs-real floor at a handful of evaluations, its
energy twin ``digits-e`` following its labels at a comparable distance, and ``em-digits`` sharp.
"""
from __future__ import annotations

import pytest

from models import BUNDLED
from models import load_model
from models.judge import Judge
from models.judge_runs import draw

PER_CLASS = 20


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.shared()


@pytest.fixture(scope="module")
def digits_scores(judge):
    drawn = draw(load_model(BUNDLED["digits"]), per_class=PER_CLASS)
    return drawn, judge.score(drawn.images, drawn.labels)


def test_digits_defaults_sit_at_the_knee(judge, digits_scores):
    drawn, scores = digits_scores
    floor = judge.floor(scores.count)
    assert drawn.mean_nfe <= 8                          # one row per step, about 7 steps
    assert scores.fd < 2.5 * floor.fd
    assert scores.accuracy >= 0.95 and scores.recall >= 0.75


def test_descending_past_the_knee_loses_variety(judge, digits_scores):
    """The former defaults' regime: 60 guided steps sharpen and lose coverage; accuracy barely notices."""
    _, knee = digits_scores
    drawn = draw(load_model(BUNDLED["digits"]), {"cfg_scale": 1.5, "max_steps": 60, "grad_norm_threshold": 0.0},
                 per_class=PER_CLASS)
    long = judge.score(drawn.images, drawn.labels)
    assert long.fd > 3 * knee.fd and long.recall < knee.recall
    assert long.accuracy >= knee.accuracy - 0.02


def test_digits_e_follows_its_labels(judge, digits_scores):
    drawn = draw(load_model(BUNDLED["digits-e"]), per_class=PER_CLASS)
    scores = judge.score(drawn.images, drawn.labels)
    assert scores.accuracy >= 0.9
    assert scores.fd <= 1.5 * digits_scores[1].fd


def test_em_digits_samples_are_sharp(judge):
    drawn = draw(load_model(BUNDLED["em-digits"]), unconditional=10 * PER_CLASS)
    scores = judge.score(drawn.images)
    assert scores.precision >= 0.6
    assert scores.fd < 5 * judge.floor(scores.count).fd
