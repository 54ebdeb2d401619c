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
from typing import Sequence

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
