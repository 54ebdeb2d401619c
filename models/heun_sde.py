"""The Stratonovich Euler-Heun SDE sampler of Energy Matching, per sample.

The SDE ``dx = v(x) dt + sqrt(2 eps(t)) dW`` with ``v = -dV/dx`` (the field's direction) and the
temperature schedule (official ``plot_epsilon``)::

    eps(t) = 0                                           t <  time_cutoff
           = eps_max * (t - time_cutoff) / (1 - time_cutoff)   time_cutoff <= t < 1
           = eps_max                                     t >= 1

One Heun step of sample ``s`` from ``t0 = k * dt`` to ``t1 = t0 + dt`` (``k`` = the sample's own step
count, so a sample's time is its own and samples join and leave a running batch at any step)::

    f0 = v(x)                                    # evaluation 1
    if ||f0||_2 < grad_norm_threshold: stop      # adaptive stopping (0 = never)
    dW = sqrt(dt) * z,  z ~ N(0, I) drawn from (seed, k) alone
    x' = x + dt * f0 + sqrt(2 eps(t0)) * dW
    f1 = v(x')                                   # evaluation 2
    x  = x + dt/2 * (f0 + f1) + (sqrt(2 eps(t0)) + sqrt(2 eps(t1)))/2 * dW

This is torchsde's Stratonovich Heun for diagonal noise (``sdeint(method="heun")``) on the official
time grid ``0, dt, ..., t_end`` (``round(t_end / dt)`` steps); the final image is clamped to [-1, 1].
``eps_max = 0`` is the deterministic Heun flow. Every step costs two field evaluations (NFE = 2 per
step, plus the one that finds the norm below the threshold).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

NFE_PER_STEP = 2
_SEED_MIX = 0x9E3779B97F4A7C15            # spreads (seed, step) pairs over the generator's seed space


@dataclass(frozen=True)
class HeunSDEParams:
    """Per-sample settings. Defaults: the official CIFAR-10 setting of the reported FID 3.3."""

    dt: float = 0.01
    max_steps: int = 325                  # t_end / dt: t_end = 3.25
    epsilon_max: float = 0.01
    time_cutoff: float = 1.0
    grad_norm_threshold: float = 0.0      # 0 = run every step

    def __post_init__(self):
        if not self.dt > 0:
            raise ValueError(f"dt must be > 0, got {self.dt}")
        if self.max_steps < 0:
            raise ValueError(f"max steps must be >= 0, got {self.max_steps}")
        if not self.epsilon_max >= 0:
            raise ValueError(f"epsilon max must be >= 0, got {self.epsilon_max}")
        if not self.time_cutoff <= 1:
            raise ValueError(f"time cutoff must be <= 1 (the temperature reaches epsilon max at t = 1), got {self.time_cutoff}")
        if not self.grad_norm_threshold >= 0:
            raise ValueError(f"gradient-norm threshold must be >= 0, got {self.grad_norm_threshold}")

    @classmethod
    def for_t_end(cls, t_end: float, dt: float = 0.01, **kw) -> "HeunSDEParams":
        """The official ``--t_end`` form: ``round(t_end / dt)`` steps of ``dt``."""
        return cls(dt=dt, max_steps=int(round(t_end / dt)), **kw)

    @property
    def t_end(self) -> float:
        return self.max_steps * self.dt


def epsilon(t: float, epsilon_max: float, time_cutoff: float) -> float:
    """The temperature at time ``t`` (see the module docstring)."""
    if t < time_cutoff:
        return 0.0
    if t < 1.0:
        return epsilon_max * (t - time_cutoff) / (1.0 - time_cutoff)
    return epsilon_max


def diffusion(t: float, p: HeunSDEParams) -> float:
    """``sqrt(2 eps(t))``, the noise scale per unit Brownian increment."""
    return math.sqrt(2.0 * epsilon(t, p.epsilon_max, p.time_cutoff))


def step_noise(seed: int, step: int, shape: Sequence[int]) -> torch.Tensor:
    """z of sample ``seed`` at its step ``step``: float32 N(0, I) from a CPU generator seeded by the pair
    alone, so it does not depend on the batch, the device or the order samples were stepped in."""
    mixed = (int(seed) * _SEED_MIX + int(step) + 1) % (1 << 63)
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(mixed), dtype=torch.float32)


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
