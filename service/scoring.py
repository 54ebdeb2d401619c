"""Energy score: EqM's gradient norm at an input says how far it is from the data (out-of-distribution).

EqM's field is ~0 on the data manifold and grows away from it, so one forward at the input,
``||f(x, y)||_2`` (``y`` = a class, or the null label for the unconditional field), scores an image
without any sampling. A score job (kind ``score``) holds model-sized PNG uploads in
``P:score:<id>:input:<k>``; the worker runs all of them through the model in one batch and stores, per
image, ``grad_norm`` and ``in_distribution``.

Calibration (``in_distribution``): the norm is turned into an empirical p-value against the
bundled model's held-out data, the 20% test split of the digits (``models.digits_data.load_digits_split``),
never seen in training: ``in_distribution = fraction of held-out digits whose norm is >= this image's``
(1 = as typical as the data, ~0 = farther than every held-out digit). Unconditional scores compare
with every held-out digit's unconditional norm; a score conditional on label ``c`` with the held-out
digits of class ``c`` under label ``c``. The sorted reference norms are written next to the weights
(``<checkpoint stem>.scores.json``) by ``python -m service.scoring digits``; a model without that file
gets ``in_distribution: null`` (the norm alone still ranks images).

Models with an energy (EqM-E, through the model seam's ``energy``) are scored by that energy instead
(the paper's OOD score, lower on data), reported beside the gradient norm, and calibrated the same way
on held-out energies; each result says which score it used (``score``: ``energy`` or ``grad_norm``).
"""
from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.family import as_field

SCORE_KIND = "score"


@dataclass(frozen=True)
class Calibration:
    unconditional: list[float]             # sorted held-out norms under the null label
    per_class: dict[int, list[float]]      # sorted held-out norms of class c under label c

    def in_distribution(self, norm: float, label: int | None) -> float | None:
        ref = self.unconditional if label is None else self.per_class.get(label)
        if not ref:
            return None
        at_least = len(ref) - bisect.bisect_left(ref, norm)     # reference norms >= norm
        return round(at_least / len(ref), 6)

    @classmethod
    def load(cls, path: Path) -> "Calibration | None":
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(sorted(raw["unconditional"]), {int(c): sorted(v) for c, v in raw["per_class"].items()})


def score_input_key(prefix: str, job_id: str, k: int) -> str:
    """Redis key of upload ``k`` of a score job (see ``service.jobstore``)."""
    return f"{prefix}:score:{job_id}:input:{k}"


def run_score_job(r, prefix: str, spec, runner, null_label: int, calibration: Calibration | None) -> list[dict]:
    """The worker's side of a score job: read its uploads, one batched forward, the per-image results."""
    from service.images import decode_image
    keys = [score_input_key(prefix, spec.id, k) for k in range(len(spec.images))]
    blobs = r.mget(keys)
    if any(b is None for b in blobs):
        raise ValueError("a score job's uploads were not found (expired?)")
    x = torch.stack([runner.encode_pixels(decode_image(b, runner.image_size, runner.channels)) for b in blobs])
    labels = spec.images[0].labels if spec.images else []
    return score_latents(runner.field, x, labels[0] if labels else None, null_label, calibration)


def calibration_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".scores.json")


@torch.no_grad()
def field_scores(model, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``||direction||_2``, energy or None) per image, float32 on the CPU; ``x`` (N, C, H, W) float32,
    ``labels`` (N,) long; ``model`` a ``GradientField`` or a bare (implicit) network."""
    field = as_field(model)
    direction, energy = field.direction_and_energy(x.to(field.device, field.dtype), labels.to(field.device))
    norms = direction.float().flatten(1).norm(dim=1).cpu()
    return norms, None if energy is None else energy.cpu()


def gradient_norms(model, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``||f(x, y)||_2`` per image (the update direction's norm), in float32."""
    return field_scores(model, x, labels)[0]


def score_latents(model, x: torch.Tensor, label: int | None, null_label: int,
                  calibration: Calibration | None) -> list[dict]:
    """Per image ``{"index", "grad_norm", "energy", "score", "in_distribution"}`` (one batched evaluation);
    ``score`` names what ``in_distribution`` calibrates: the energy where the model has one, else the norm."""
    y = torch.full((x.shape[0],), null_label if label is None else label, dtype=torch.long)
    norms, energies = field_scores(model, x, y)
    out = []
    for k, n in enumerate(norms.tolist()):
        energy = None if energies is None else float(energies[k])
        value = float(n) if energy is None else energy
        out.append({"index": k, "grad_norm": float(n), "energy": energy,
                    "score": "grad_norm" if energy is None else "energy",
                    "in_distribution": calibration.in_distribution(value, label) if calibration else None})
    return out


def calibrate_digits(checkpoint: str = "digits") -> dict:
    """Held-out reference norms of the digits model (its test split), unconditional and per class."""
    from models import load_model
    from models.digits_data import load_digits_split
    loaded = load_model(checkpoint, device="cpu")
    model, null = loaded.field, loaded.model.config.null_label
    from models.codecs import IdentityCodec
    split = load_digits_split()
    codec = IdentityCodec(1, split.x_test.shape[-1])
    x, y = codec.encode(codec.decode(split.x_test)).float(), split.y_test     # as uploads arrive: uint8 pixels
    def score(labels):      # the energy where the model has one (what score jobs calibrate), else the norm
        norms, energies = field_scores(model, x, labels)
        return norms if energies is None else energies

    uncond = score(torch.full_like(y, null))
    cond = score(y)
    per_class = {int(c): sorted(cond[y == c].tolist()) for c in torch.unique(y)}
    return {"source": "digits test split (20%, stratified, seed 0), never used in training; uint8 pixels",
            "score": "energy" if model.has_energy else "grad_norm",
            "count": int(x.shape[0]), "unconditional": [round(v, 5) for v in sorted(uncond.tolist())],
            "per_class": {str(c): [round(n, 5) for n in v] for c, v in per_class.items()},
            "median_unconditional": float(np.median(uncond.numpy()))}


def main(argv: list[str] | None = None) -> int:
    """``python -m service.scoring [digits]``: write the bundled model's calibration file."""
    from models import resolve_checkpoint
    name = (argv if argv is not None else sys.argv[1:] or ["digits"])[0]
    data = calibrate_digits(name)
    path = calibration_path(resolve_checkpoint(name))
    path.write_text(json.dumps(data) + "\n")
    print(f"wrote {path}: {data['count']} held-out digits, median unconditional {data['score']} "
          f"{data['median_unconditional']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
