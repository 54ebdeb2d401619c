"""Gradient-descent sampling on the EqM field: GD, NAG-GD, guidance, composition, adaptive stopping.

One sampling step for sample ``s`` with rows ``r_k`` (one per condition) and weights ``w_k``::

    x_look = x + eta * mu * m                       # Nesterov look-ahead (GD: mu = 0)
    g      = sum_k w_k * f(x_look, y_k)             # guided channels; other channels: f(x_look, y_0)
    if ||g||_2 < grad_norm_threshold: stop          # adaptive compute: x is kept as it is
    m = g;  x = x + eta * g;  steps += 1            # stop too once steps == max_steps

With ``m = 0`` at the start this is exactly the official ``sample_gd.py`` loop (which runs
``num_sampling_steps - 1`` updates). How conditions become rows and weights (``condition_rows``):

- no label: one null row, weight 1;
- labels ``y_1..y_K`` with weights ``w_k`` and guidance scale ``s``:
  ``g = u + s * sum_k w_k * (c_k - u)`` where ``c_k = f(x, y_k)`` and ``u = f(x, null)``, i.e. rows
  ``y_k`` with weight ``s * w_k`` and a null row with weight ``1 - s * sum_k w_k`` (dropped when 0).
  One label with ``s`` is classifier-free guidance; ``s = 1`` is plain conditional sampling; two or
  more labels are a composition (default weights ``1/K``: the mean of the conditional fields).

The per-sample state lives in a ``SlotBatch`` of fixed capacity: samples join and leave at any
step (EqM has no timestep), which the worker engine uses for continuous batching and the offline
``sample()`` below uses with every sample joining at step 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kernels.nag_step import nag_step

SAMPLERS = ("nag", "gd")


@dataclass(frozen=True)
class SamplerParams:
    """Per-sample descent settings. Defaults: the paper's EqM-XL/2 setting (NAG-GD, 249 updates)."""

    sampler: str = "nag"
    step_size: float = 0.0017
    mu: float = 0.3
    max_steps: int = 249
    grad_norm_threshold: float = 0.0     # 0 = never stop early

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if not self.step_size > 0:
            raise ValueError(f"step size must be > 0, got {self.step_size}")
        if not 0 <= self.mu < 1:
            raise ValueError(f"mu must be in [0, 1), got {self.mu}")
        if self.max_steps < 0:
            raise ValueError(f"max steps must be >= 0, got {self.max_steps}")
        if not self.grad_norm_threshold >= 0:
            raise ValueError(f"gradient-norm threshold must be >= 0, got {self.grad_norm_threshold}")

    @property
    def momentum(self) -> float:
        """The look-ahead factor actually used: GD evaluates at x itself."""
        return self.mu if self.sampler == "nag" else 0.0


@dataclass(frozen=True)
class Condition:
    """What a sample is conditioned on: no label, one label, or a weighted composition of labels."""

    labels: tuple[int, ...] = ()
    weights: tuple[float, ...] | None = None   # per label; default 1/K each
    cfg_scale: float = 1.0

    def label_weights(self) -> tuple[float, ...]:
        if self.weights is None:
            return tuple(1.0 / len(self.labels) for _ in self.labels)
        if len(self.weights) != len(self.labels):
            raise ValueError(f"{len(self.weights)} weights given for {len(self.labels)} labels")
        return tuple(float(w) for w in self.weights)


def condition_rows(cond: Condition, null_label: int) -> list[tuple[int, float]]:
    """(label, weight) of each model row of a sample; the first row is the primary (conditional) one."""
    if not cond.labels:
        return [(null_label, 1.0)]
    weights = cond.label_weights()
    rows = [(int(y), cond.cfg_scale * w) for y, w in zip(cond.labels, weights)]
    null_weight = 1.0 - cond.cfg_scale * sum(weights)
    if abs(null_weight) > 1e-12:
        rows.append((null_label, null_weight))
    return rows


def noise_for_seed(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The initial latent of one image: float32 normal noise from a CPU generator (device independent)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def partially_noised(x: torch.Tensor, level: float, noise: torch.Tensor) -> torch.Tensor:
    """The EqM training interpolation ``g*x + (1-g)*eps``: ``level = 1`` keeps x, ``0`` is pure noise."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"noise level g must be in [0, 1], got {level}")
    return level * x + (1.0 - level) * noise


class SlotBatch:
    """Fixed-capacity sampler state on one device: ``capacity`` sample slots and ``max_rows`` model rows.

    Invariants: ``x``/``m`` are float32 whatever the model dtype; ``model_in[r]`` always holds the
    look-ahead point of the sample owning row ``r`` (the fused step writes it), so a forward needs no
    gather; rows are handed out lowest-first so active rows stay packed at the front and the forward
    runs on ``model_in[:bucket]``, the smallest bucket covering the highest row in use.
    """

    def __init__(self, model: torch.nn.Module, capacity: int, max_rows: int, sample_shape: Sequence[int],
                 null_label: int, guided_channels: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, row_buckets: Sequence[int] | None = None,
                 forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if capacity < 1 or max_rows < 1:
            raise ValueError("capacity and max_rows must be >= 1")
        self.model = model
        self.forward = forward or model
        self.capacity, self.max_rows = capacity, max_rows
        self.sample_shape = tuple(sample_shape)
        self.null_label, self.guided_channels = null_label, guided_channels
        self.device, self.dtype = torch.device(device), dtype
        buckets = sorted(set(row_buckets or ())) or _default_buckets(max_rows)
        self.row_buckets = [b for b in buckets if b < max_rows] + [max_rows]
        f32 = dict(device=self.device, dtype=torch.float32)
        i32 = dict(device=self.device, dtype=torch.int32)
        self.x = torch.zeros(capacity, *self.sample_shape, **f32)
        self.m = torch.zeros(capacity, *self.sample_shape, **f32)
        self.eta = torch.zeros(capacity, **f32)
        self.mu = torch.zeros(capacity, **f32)
        self.threshold = torch.zeros(capacity, **f32)
        self.max_steps = torch.zeros(capacity, **i32)
        self.steps = torch.zeros(capacity, **i32)
        self.norm = torch.zeros(capacity, **f32)
        self.finished = torch.zeros(capacity, device=self.device, dtype=torch.int8)
        self.model_in = torch.zeros(max_rows, *self.sample_shape, device=self.device, dtype=dtype)
        self.labels = torch.full((max_rows,), null_label, device=self.device, dtype=torch.long)
        self.free_slots = list(range(capacity))
        self.free_rows = list(range(max_rows))
        self.slot_rows: dict[int, list[int]] = {}
        self.slot_weights: dict[int, list[float]] = {}
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- membership -----------------------------------------------------------------------------
    def can_admit(self, n_rows: int) -> bool:
        return bool(self.free_slots) and len(self.free_rows) >= n_rows

    def admit(self, x0: torch.Tensor, rows: list[tuple[int, float]], params: SamplerParams) -> int:
        """Put one sample in a free slot, starting at ``x0``; returns the slot index."""
        if not self.can_admit(len(rows)):
            raise RuntimeError("no free slot or not enough free rows")
        if tuple(x0.shape) != self.sample_shape:
            raise ValueError(f"start latent has shape {tuple(x0.shape)}, expected {self.sample_shape}")
        self.free_slots.sort()
        self.free_rows.sort()
        slot = self.free_slots.pop(0)
        row_ids = [self.free_rows.pop(0) for _ in rows]
        x0 = x0.to(self.device, torch.float32)
        self.x[slot] = x0
        self.m[slot] = 0.0
        self.eta[slot] = params.step_size
        self.mu[slot] = params.momentum
        self.threshold[slot] = params.grad_norm_threshold
        self.max_steps[slot] = params.max_steps
        self.steps[slot] = 0
        self.norm[slot] = float("nan")
        # A zero step budget is finished before it starts (nothing to evaluate).
        self.finished[slot] = int(params.max_steps == 0)
        for r, (label, _) in zip(row_ids, rows):
            self.model_in[r] = x0.to(self.dtype)     # m = 0, so the first look-ahead is x0 itself
            self.labels[r] = label
        self.slot_rows[slot] = row_ids
        self.slot_weights[slot] = [w for _, w in rows]
        self._plan = None
        return slot

    def release(self, slot: int) -> None:
        """Free a slot and its rows (its row labels revert to null so padded rows stay finite)."""
        rows = self.slot_rows.pop(slot)
        self.slot_weights.pop(slot)
        for r in rows:
            self.labels[r] = self.null_label
        self.free_rows.extend(rows)
        self.free_slots.append(slot)
        self._plan = None

    @property
    def occupied(self) -> list[int]:
        return sorted(self.slot_rows)

    # -- one step -------------------------------------------------------------------------------
    def _build_plan(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = max(len(self.slot_rows[s]) for s in slots)
        rows = [self.slot_rows[s] + [-1] * (k - len(self.slot_rows[s])) for s in slots]
        weights = [self.slot_weights[s] + [0.0] * (k - len(self.slot_weights[s])) for s in slots]
        return (torch.tensor(slots, dtype=torch.int32, device=self.device),
                torch.tensor(rows, dtype=torch.int32, device=self.device),
                torch.tensor(weights, dtype=torch.float32, device=self.device))

    def bucket_for(self, high_row: int) -> int:
        return next(b for b in self.row_buckets if b >= high_row)

    def step(self, slots: list[int]) -> None:
        """One forward on the rows of ``slots`` (all must be unfinished) and one fused NAG-GD step."""
        if not slots:
            return
        if self._plan is None or self._plan[0].numel() != len(slots) or self._plan_slots != slots:
            self._plan = self._build_plan(slots)
            self._plan_slots = list(slots)
        slot_ids, rows, weights = self._plan
        high = 1 + max(max(self.slot_rows[s]) for s in slots)
        bucket = self.bucket_for(high)
        out = self.forward(self.model_in[:bucket], self.labels[:bucket])       # (bucket, C, H, W)
        out = out.contiguous()   # learn_sigma models return a channel slice; the fused step wants dense rows
        # The kernel indexes rows of ``out``; rows past the bucket are unused, so it gets the same view.
        nag_step(out, self.x, self.m, self.model_in[:bucket], slot_ids, rows, weights, self.eta, self.mu,
                 self.threshold, self.max_steps, self.steps, self.norm, self.finished, self.guided_channels)

    def snapshot(self, slots: list[int]) -> tuple[list[int], list[float], list[bool]]:
        """Steps taken, last gradient norm and finished flag of ``slots`` (one device->host copy)."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        packed = torch.stack([self.steps[idx].float(), self.norm[idx], self.finished[idx].float()]).cpu()
        return packed[0].long().tolist(), packed[1].tolist(), [bool(f) for f in packed[2].tolist()]


def _default_buckets(max_rows: int) -> list[int]:
    buckets, b = [], 1
    while b < max_rows:
        buckets.append(b)
        b *= 2
    return buckets + [max_rows]


@dataclass
class SampleResult:
    latents: torch.Tensor                 # (N, C, H, W) float32, on CPU
    steps: list[int]                      # gradient updates taken by each sample
    grad_norms: list[float]               # last ||g|| of each sample
    stopped_early: list[bool] = field(default_factory=list)   # stopped below its threshold


@torch.no_grad()
def sample(model: torch.nn.Module, start: torch.Tensor, conditions: Sequence[Condition],
           params: SamplerParams | Sequence[SamplerParams], *, null_label: int, guided_channels: int,
           dtype: torch.dtype | None = None, progress: Callable[[int, int], None] | None = None) -> SampleResult:
    """Run every sample from ``start`` (N, C, H, W) until it stops; all samples share one batch."""
    n = start.shape[0]
    if len(conditions) != n:
        raise ValueError(f"{len(conditions)} conditions given for {n} start latents")
    per_sample = list(params) if isinstance(params, (list, tuple)) else [params] * n
    if len(per_sample) != n:
        raise ValueError(f"{len(per_sample)} sampler settings given for {n} start latents")
    row_sets = [condition_rows(c, null_label) for c in conditions]
    param = next(model.parameters())
    batch = SlotBatch(model, capacity=n, max_rows=sum(len(r) for r in row_sets), sample_shape=start.shape[1:],
                      null_label=null_label, guided_channels=guided_channels, device=param.device,
                      dtype=dtype or param.dtype, row_buckets=[sum(len(r) for r in row_sets)])
    slots = [batch.admit(start[i], row_sets[i], per_sample[i]) for i in range(n)]
    total = max(p.max_steps for p in per_sample)
    done = [p.max_steps == 0 for p in per_sample]
    for step in range(total):
        active = [s for s, d in zip(slots, done) if not d]
        if not active:
            break
        batch.step(active)
        _, _, finished = batch.snapshot(slots)
        done = finished
        if progress is not None:
            progress(step + 1, total)
    steps, norms, _ = batch.snapshot(slots)
    stopped = [s < p.max_steps for s, p in zip(steps, per_sample)]
    return SampleResult(latents=batch.x[slots].cpu(), steps=steps, grad_norms=norms, stopped_early=stopped)
