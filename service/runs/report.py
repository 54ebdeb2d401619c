"""A finished run's report: the quality judge's figures for 8x8 digit models, the ADM evaluator's command
for every other model.

The judge (``models.judge.Judge``: FD, k-NN precision/recall, accuracy on the requested labels) judges the
same images ``eqm eval`` judges on the run's .npz (at most ``models.judge.MAX_JUDGED_IMAGES``, spread evenly),
so the two give the same figures; a judge failure is reported, never loses the run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("eqm.runs")

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
        from models.judge import Judge, spread
        images, labels = spread(images, labels)
        return {**Judge.shared().score(images, labels).row(), "judged_images": int(len(images))}
    except Exception as exc:          # a judge failure must not lose a finished run
        log.exception("judging the run failed")
        return {"error": f"the quality judge failed: {exc}"}
