"""A finished run's report: the quality judge's figures for 8x8 digit models, the ADM evaluator's command
for every other model.

The judge (``models.judge.Judge``: FD, k-NN precision/recall, accuracy on the requested labels) is looked
up when a run finishes; a build without it says so in the report instead of failing the run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("eqm.runs")

# The judge's k-NN precision/recall compares every pair of images (memory grows as N^2): a larger run is
# judged on this many images spread evenly over it (uniform labels stay uniform).
JUDGE_MAX_IMAGES = 2000

ADM_EVALUATOR = ("python evaluations/evaluator.py <reference batch .npz of the dataset> {path} "
                 "(openai/guided-diffusion; reference batches such as VIRTUAL_imagenet256_labeled.npz)")


def evaluate(samples: Path, record: dict) -> dict:
    report = {"samples": str(samples), "adm_evaluator": ADM_EVALUATOR.format(path=samples.name)}
    if tuple(record["image_size"]) != (8, 8) or record["channels"] != 1:
        return report
    with np.load(samples, allow_pickle=False) as z:
        images, labels = z["arr_0"], z["arr_1"]
    report["judge"] = judge_digits(images, labels)
    return report


def judge_digits(images: np.ndarray, labels: np.ndarray) -> dict:
    """``{"fd", "precision", "recall", "accuracy", "count"}`` from the quality judge, or ``{"error": why}``."""
    try:
        from models.judge import Judge
    except ImportError:
        return {"error": "the quality judge (models.judge) is not part of this build; run `eqm eval` on the .npz"}
    if len(images) > JUDGE_MAX_IMAGES:
        pick = np.linspace(0, len(images) - 1, JUDGE_MAX_IMAGES).round().astype(np.int64)
        images, labels = images[pick], labels[pick]
    try:
        return {**Judge.shared().score(images, labels).row(), "judged_images": int(len(images))}
    except Exception as exc:          # a judge failure must not lose a finished run
        log.exception("judging the run failed")
        return {"error": f"the quality judge failed: {exc}"}
