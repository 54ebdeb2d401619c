"""The Euler-Heun SDE sampler of ``models.heun_sde`` as a plain loop over a batch that shrinks as samples
stop: the reference the engine's slot-batch form (``models.heun_slots``) is held to in the tests."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from models.heun_sde import HeunSDEParams, diffusion, step_noise


def heun_update(x: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor, dt: torch.Tensor,
                noise_mid: torch.Tensor | None) -> torch.Tensor:
    """The corrector: ``x + dt/2 (f0 + f1) + noise_mid`` with ``noise_mid = (g0 + g1)/2 * dW`` (or None)."""
    dt = dt.view(-1, *([1] * (x.dim() - 1)))
    out = x + 0.5 * dt * (f0 + f1)
    return out if noise_mid is None else out + noise_mid


@dataclass
class HeunResult:
    latents: torch.Tensor                 # (N, C, H, W) float32 on CPU, clamped to [-1, 1]
    steps: list[int]                      # Heun steps taken by each sample
    grad_norms: list[float]               # ||v|| at each sample's last evaluated start point
    stopped_early: list[bool]
    energies: list[float] | None          # V of each final image (None: the field has no energy)
    nfe: int                              # field evaluations of the sampling, per row, all samples


@torch.no_grad()
def sample_heun(direction: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
                params: HeunSDEParams | Sequence[HeunSDEParams], seeds: Sequence[int], *,
                energy: Callable[[torch.Tensor], torch.Tensor] | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                progress: Callable[[int, int], None] | None = None) -> HeunResult:
    """Integrate every sample from ``start`` (N, C, H, W); a sample leaves the batch when it stops.

    ``direction(x)`` is the field's update direction (``-dV/dx``) of a batch of rows in ``dtype`` on
    ``device``; the state stays float32. ``energy(x)``, when given, is evaluated once on the final images.
    """
    n = start.shape[0]
    per = list(params) if isinstance(params, (list, tuple)) else [params] * n
    if len(per) != n or len(seeds) != n:
        raise ValueError(f"{len(per)} settings and {len(seeds)} seeds given for {n} start points")
    device = torch.device(device)
    x = start.detach().to(device=device, dtype=torch.float32).clone()
    shape = tuple(start.shape[1:])
    dt = torch.tensor([p.dt for p in per], device=device, dtype=torch.float32)
    steps, norms, stopped = [0] * n, [float("nan")] * n, [False] * n
    nfe = 0
    active = [i for i in range(n) if per[i].max_steps > 0]
    total = max((p.max_steps for p in per), default=0)
    while active:
        idx = torch.tensor(active, device=device)
        xa = x.index_select(0, idx)                                             # (A, C, H, W)
        f0 = direction(xa.to(dtype)).float()
        nfe += len(active)
        norm = f0.flatten(1).norm(dim=1).tolist()
        going = []
        for j, i in enumerate(active):
            norms[i] = norm[j]
            if norm[j] < per[i].grad_norm_threshold:
                stopped[i] = True
            else:
                going.append(j)
        if not going:
            break
        if len(going) < len(active):
            keep = torch.tensor(going, device=device)
            xa, f0 = xa.index_select(0, keep), f0.index_select(0, keep)
            active = [active[j] for j in going]
            idx = torch.tensor(active, device=device)
        dta = dt.index_select(0, idx)
        predictor = xa + dta.view(-1, 1, 1, 1) * f0
        noise_mid = None
        g = [(diffusion(steps[i] * per[i].dt, per[i]), diffusion((steps[i] + 1) * per[i].dt, per[i])) for i in active]
        if any(g0 > 0 or g1 > 0 for g0, g1 in g):
            dw = torch.stack([step_noise(seeds[i], steps[i], shape) * math.sqrt(per[i].dt) for i in active]).to(device)
            g0 = torch.tensor([a for a, _ in g], device=device).view(-1, 1, 1, 1)
            g1 = torch.tensor([b for _, b in g], device=device).view(-1, 1, 1, 1)
            predictor = predictor + g0 * dw
            noise_mid = 0.5 * (g0 + g1) * dw
        f1 = direction(predictor.to(dtype)).float()
        nfe += len(active)
        x.index_copy_(0, idx, heun_update(xa, f0, f1, dta, noise_mid))
        for i in active:
            steps[i] += 1
        active = [i for i in active if steps[i] < per[i].max_steps]
        if progress is not None:
            progress(max(steps), total)
    final = x.clamp(-1.0, 1.0)
    energies = None
    if energy is not None:
        energies = energy(final.to(dtype)).float().cpu().tolist()
    return HeunResult(latents=final.cpu(), steps=steps, grad_norms=norms, stopped_early=stopped,
                      energies=energies, nfe=nfe)
