"""A sampling run's plan: its labels, seeds and shards (pure: no I/O, no Redis).

Image ``i`` of a run uses seed ``seed + i`` and label ``labels[i]``, exactly as a single request with
that seed would, so any image of a run can be regenerated alone (``eqm sample --labels y --seed s``).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict

from service.jobstore import ImageSpec, JobSpec, SamplerSpec
from service.runs.store import shard_relpath

DEFAULT_PRIORITY = -1          # below every interactive request (their priorities are 0..9)


class PlanError(ValueError):
    """A run request that cannot be planned (one line; the API answers 422 with it)."""


def uniform_labels(num_samples: int, num_classes: int) -> list[int]:
    """The ADM convention: ``num_samples / num_classes`` images per class, classes in order (blocks of
    equal size, the first classes one image longer when the division is not exact). Unconditional: -1."""
    if num_classes == 0:
        return [-1] * num_samples
    per, extra = divmod(num_samples, num_classes)
    out: list[int] = []
    for y in range(num_classes):
        out += [y] * (per + (1 if y < extra else 0))
    return out


def run_labels(labels, num_samples: int, num_classes: int) -> list[int]:
    """``"uniform"`` or an explicit list of resolved class indices, checked against the run's size."""
    if labels == "uniform":
        return uniform_labels(num_samples, num_classes)
    if num_classes == 0:
        raise PlanError("this model is unconditional (it has no classes): leave labels out or give \"uniform\"")
    if len(labels) != num_samples:
        raise PlanError(f"labels lists {len(labels)} labels for num_samples={num_samples}: give one per image, "
                        "or \"uniform\"")
    for i, y in enumerate(labels):
        if not 0 <= y < num_classes:
            raise PlanError(f"labels[{i}] = {y} is not a class of this model (0..{num_classes - 1})")
    return list(labels)


def shard_bounds(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``(start, count)`` of each shard, in order."""
    return [(start, min(shard_size, num_samples - start)) for start in range(0, num_samples, shard_size)]


def new_run(*, model: str, labels: list[int], seed: int, cfg_scale: float, sampler: SamplerSpec,
            shard_size: int, priority: int, image_size: tuple[int, int], channels: int) -> dict:
    """The run record as the store keeps it (``service.runs.store``)."""
    run_id = uuid.uuid4().hex
    return {"id": run_id, "model": model, "num_samples": len(labels), "labels": labels, "seed": seed,
            "cfg_scale": cfg_scale, "sampler": asdict(sampler), "shard_size": shard_size, "priority": priority,
            "image_size": list(image_size), "channels": channels, "status": "running", "error": None,
            "created": time.time(), "finished": None, "report": None,
            "shards": [{"index": k, "start": start, "count": count, "job": None, "attempts": 0, "failures": 0,
                        "done": False, "done_at": None, "nfe": 0}
                       for k, (start, count) in enumerate(shard_bounds(len(labels), shard_size))]}


def shard_job(record: dict, shard: dict) -> JobSpec:
    """Shard ``shard`` of the run as an ordinary generation job whose images go to the results store."""
    start, count, seed = shard["start"], shard["count"], record["seed"]
    labels = record["labels"][start:start + count]
    images = [ImageSpec(seed=seed + start + i, labels=[] if y < 0 else [y]) for i, y in enumerate(labels)]
    job_id = f"{record['id']}s{shard['index']:05d}a{shard['attempts']}"
    return JobSpec(kind="generate", model=record["model"], images=images, cfg_scale=record["cfg_scale"],
                   sampler=SamplerSpec(**record["sampler"]), priority=record["priority"], format="png",
                   id=job_id, results=shard_relpath(record["id"], shard["index"]))
