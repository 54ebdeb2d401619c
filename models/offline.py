"""Offline sampling, top to bottom: load -> settings -> noise -> descend -> decode.

``from models import load_model, sample``: a bundled name or a checkpoint file of any family, sampled
with the model's recommended settings (what the API serves by default) or any of them given by name.
The steps are the engine's own (``models.sampler.sample`` runs the slot batch the worker runs), and
the noise of image ``i`` is ``noise_for_seed(seed + i)``, as ``eqm sample --seed`` draws it, so the
same call gives the same images as the command line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch

from models.codecs import make_codec
from models.family import LoadedModel, SamplingDefaults
from models.registry import describe_model, load_model
from models.sampler import Condition, SamplerParams, noise_for_seed
from models.sampler import sample as descend

# Settings a call may give by name (SamplerParams' fields and the guidance scale).
SETTINGS = tuple(f.name for f in fields(SamplerParams)) + ("cfg_scale",)


@dataclass
class Samples:
    images: np.ndarray | None             # (N, H, W, C) uint8; None with decode=False
    latents: torch.Tensor                 # (N, C, H, W) float32 on the CPU: what the model descended in
    steps: list[int]                      # updates taken by each image (Heun steps for the SDE sampler)
    grad_norms: list[float]               # last gradient norm of each image
    energies: list[float] | None          # final energy of each image (lower on data); None: no energy


def settings_for(defaults: SamplingDefaults, given: dict) -> tuple[SamplerParams, float]:
    """The model's recommended settings with those given by name over them: (sampler settings, CFG scale)."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown sampler setting {', '.join(unknown)}; the settings are {', '.join(SETTINGS)}")
    base = {"sampler": defaults.sampler, "step_size": defaults.step_size, "mu": defaults.mu,
            "max_steps": defaults.max_steps, "grad_norm_threshold": defaults.grad_norm_threshold,
            "epsilon_max": defaults.epsilon_max, "time_cutoff": defaults.time_cutoff,
            "cfg_scale": defaults.guidance_scale}
    base.update({k: v for k, v in given.items() if v is not None})
    cfg_scale = float(base.pop("cfg_scale"))
    return SamplerParams(**base), cfg_scale


@torch.no_grad()
def sample(model: LoadedModel | str | os.PathLike, n: int | None = None, *,
           labels: Sequence[int | Sequence[int]] | None = None, seed: int = 0, noise: torch.Tensor | None = None,
           device: str | None = None, vae: str | None = None, decode: bool = True,
           progress: Callable[[int, int], None] | None = None, **settings) -> Samples:
    """``n`` images (or one per entry of ``labels``: a class, or a tuple of classes to compose).

    ``model``: a ``LoadedModel`` or what ``load_model`` takes. ``settings``: any of ``SETTINGS``
    (``max_steps=20``, ``cfg_scale=2.0``, ...); the rest are the model's recommended ones.
    ``noise``: the start (N, C, H, W) instead of ``noise_for_seed(seed + i)``.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device or "cpu")
    params, cfg_scale = settings_for(describe_model(loaded.source).defaults, settings)
    field = loaded.field
    shape = field.sample_shape
    label_sets = [tuple(y) if isinstance(y, (tuple, list)) else (int(y),) for y in labels] if labels else None
    count = len(label_sets) if label_sets else noise.shape[0] if noise is not None else n
    if not count:
        raise ValueError("say how many images: give n, labels or noise")
    label_sets = label_sets or [()] * count
    seeds = [seed + i for i in range(count)]
    start = noise if noise is not None else torch.stack([noise_for_seed(s, shape) for s in seeds])
    if tuple(start.shape) != (count, *shape):
        raise ValueError(f"noise has shape {tuple(start.shape)}, expected {(count, *shape)}")
    conditions = [Condition(labels=ys, cfg_scale=cfg_scale if ys else 1.0) for ys in label_sets]
    result = descend(field, start, conditions, params, null_label=field.null_label,
                     guided_channels=loaded.spec.guided_channels, progress=progress, seeds=seeds)
    images = None
    if decode:
        c = loaded.spec.config
        codec = make_codec(loaded.spec.codec, channels=c.in_channels, latent_size=c.input_size, vae_dir=vae,
                           device=str(field.device))
        images = codec.decode(result.latents)
    return Samples(images=images, latents=result.latents, steps=result.steps, grad_norms=result.grad_norms,
                   energies=result.energies)
