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
- ``mode="sum"`` (the paper's composition, Fig. 11): ``g = sum_k w_k * c_k``, rows ``y_k`` with weight
  ``w_k`` (default 1 each) and no null row; the guidance scale does not enter.

The per-sample state lives in a ``SlotBatch`` of fixed capacity: samples join and leave at any
step (EqM has no timestep), which the worker engine uses for continuous batching and the offline
``sample()`` below uses with every sample joining at step 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kernels.nag_step import MAX_ROWS_PER_SAMPLE, nag_step
from models import device as cuda_device
from models.family import GradientField, as_field
from models.heun_sde import HeunSDEParams
from models.update_rules import RULES, rules_for

SAMPLERS = tuple(RULES)          # "nag", "gd", "heun-sde": one update rule each (models.update_rules)
COMPOSITION_MODES = ("guided", "sum")


@dataclass(frozen=True)
class SamplerParams:
    """Per-sample descent settings. Defaults: the paper's EqM-XL/2 setting (NAG-GD, 249 updates)."""

    sampler: str = "nag"
    step_size: float = 0.0017
    mu: float = 0.3
    max_steps: int = 249
    grad_norm_threshold: float = 0.0     # 0 = never stop early
    # "heun-sde" (models/heun_sde.py): step_size is the SDE time step dt, max_steps counts Heun steps
    # (2 evaluations each), and the temperature rises from 0 at time_cutoff to epsilon_max at t = 1.
    epsilon_max: float = 0.0
    time_cutoff: float = 1.0

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
        if self.sampler == "heun-sde":
            self.heun_params()           # validates the SDE settings

    @property
    def momentum(self) -> float:
        """The look-ahead factor actually used: GD evaluates at x itself."""
        return self.mu if self.sampler == "nag" else 0.0

    def heun_params(self) -> HeunSDEParams:
        return HeunSDEParams(dt=self.step_size, max_steps=self.max_steps, epsilon_max=self.epsilon_max,
                             time_cutoff=self.time_cutoff, grad_norm_threshold=self.grad_norm_threshold)


@dataclass(frozen=True)
class Condition:
    """What a sample is conditioned on: no label, one label, or a weighted composition of labels."""

    labels: tuple[int, ...] = ()
    weights: tuple[float, ...] | None = None   # per label; default 1/K each (guided), 1 each (sum)
    cfg_scale: float = 1.0
    mode: str = "guided"                       # "guided": u + s*sum_k w_k (c_k - u); "sum": sum_k w_k c_k

    def __post_init__(self):
        if self.mode not in COMPOSITION_MODES:
            raise ValueError(f"composition mode must be one of {', '.join(COMPOSITION_MODES)}, not {self.mode!r}")

    def label_weights(self) -> tuple[float, ...]:
        if self.weights is None:
            return tuple((1.0 if self.mode == "sum" else 1.0 / len(self.labels)) for _ in self.labels)
        if len(self.weights) != len(self.labels):
            raise ValueError(f"{len(self.weights)} weights given for {len(self.labels)} labels")
        return tuple(float(w) for w in self.weights)


def condition_rows(cond: Condition, null_label: int) -> list[tuple[int, float]]:
    """(label, weight) of each model row of a sample; the first row is the primary (conditional) one."""
    if not cond.labels:
        return [(null_label, 1.0)]
    weights = cond.label_weights()
    if cond.mode == "sum":
        return [(int(y), w) for y, w in zip(cond.labels, weights)]
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


def default_row_buckets(max_rows: int) -> list[int]:
    """Forward batch sizes: 1, 2, 4, 8, then every 8 up to 128, every 16 up to 256, every 32 beyond.

    Fine enough that padding to the next bucket stays small (a gap is at most 1/9 of its bucket above
    64 rows, which is what keeps rows evaluated / NFE near 1), few enough (27 for 256 rows) to warm up
    each one before traffic and to capture each as a CUDA graph.
    """
    buckets, b = [], 1
    while b < min(8, max_rows):
        buckets.append(b)
        b *= 2
    b = 8
    while b < max_rows:
        buckets.append(b)
        b += 8 if b < 128 else 16 if b < 256 else 32
    return buckets + [max_rows]


class StagingRing:
    """Staging buffers per (dtype, shape), used in turn: A, B, A, B, ... (``depth`` of them per key).

    Each entry is ``[buffer, event]``; the event marks the end of the buffer's last copy, so a buffer is
    rewritten only after the copy ``depth`` uses ago, which is long done in practice.
    """

    def __init__(self, make: Callable[[tuple], object], depth: int = 2):
        self.make, self.depth = make, depth
        self._ring: dict[tuple, list] = {}

    def take(self, key: tuple) -> list:
        """The entry to use next for ``key`` (a new one until there are ``depth``); give it back with ``put``."""
        ring = self._ring.setdefault(key, [])
        if len(ring) < self.depth:
            return [self.make(key), None]
        return ring.pop(0)

    def put(self, key: tuple, entry: list) -> None:
        self._ring[key].append(entry)


class _Uploader:
    """Host -> device copies of small index tensors without stalling the host.

    On CUDA a copy goes through a pinned staging buffer of a ``StagingRing`` with ``non_blocking``;
    on the CPU it is a plain copy.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._ring = StagingRing(lambda key: cuda_device.pinned_empty(key[1], key[0], device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not self.cuda:
            dst.copy_(src)
            return
        key = (src.dtype, tuple(src.shape))
        entry = self._ring.take(key)
        if entry[1] is not None:
            entry[1].synchronize()        # the copy two uses ago: long done in practice
        entry[0].copy_(src)
        dst.copy_(entry[0], non_blocking=True)
        entry[1] = cuda_device.record_event(self.device)
        self._ring.put(key, entry)


class StatusRead:
    """One posted read-back of (steps, gradient norm, finished) for the slots stepped in one step."""

    def __init__(self, slots: list[int], host: torch.Tensor, event):
        self.slots, self._host, self._event = slots, host, event

    def result(self) -> tuple[list[int], list[int], list[float], list[bool]]:
        """(slots, steps, norms, finished), waiting for the copy if it is still in flight."""
        if self._event is not None:
            self._event.synchronize()
        packed = self._host[:, :len(self.slots)]
        return (self.slots, packed[0].long().tolist(), packed[1].tolist(),
                [bool(f) for f in packed[2].tolist()])


class SlotBatch:
    """Fixed-capacity sampler state on one device: ``capacity`` sample slots and ``max_rows`` model rows.

    Invariants:

    - ``x``/``m`` are float32 whatever the model dtype; ``model_in[r]`` always holds the look-ahead
      point of the sample owning row ``r`` (the fused step writes it), so a forward needs no gather.
    - Packed rows (``packed=True``): the rows of the occupied slots are exactly ``[0, n_rows)``. When a
      sample leaves, the highest rows move into its holes (``model_in`` rows and labels are copied,
      the owner's row list and the step plan are remapped), so the forward runs on ``model_in[:b]``
      with ``b`` the smallest bucket >= ``n_rows``: a finished sample stops costing anything at once.
      A moved row holds the same values and label, so no sample's trajectory changes.
    - The step plan (slot of each listed sample, its rows, its weights) lives on the device in
      fixed buffers, changed only when membership changes, through a host mirror and one upload.
    - The fused step freezes slots that already finished (``freeze_finished``), so stepping a finished
      sample once more (the status read-back may lag one step) changes nothing.

    ``packed=False`` keeps rows where they were admitted (lowest free first) and runs the forward on
    the bucket covering the highest row in use: the former behaviour, kept as a benchmark baseline.
    """

    def __init__(self, model: torch.nn.Module | GradientField, capacity: int, max_rows: int,
                 sample_shape: Sequence[int], null_label: int, guided_channels: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 row_buckets: Sequence[int] | None = None,
                 forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 packed: bool = True):
        if capacity < 1 or max_rows < 1:
            raise ValueError("capacity and max_rows must be >= 1")
        self.field = as_field(model)     # the model seam: directions (and energies) of rows
        self.model = self.field.network
        self.forward = forward or self.field.direction
        self.capacity, self.max_rows = capacity, max_rows
        self.sample_shape = tuple(sample_shape)
        self.null_label, self.guided_channels = null_label, guided_channels
        self.device, self.dtype = torch.device(device), dtype
        self.packed = packed
        buckets = sorted(set(row_buckets or ())) or default_row_buckets(max_rows)
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
        # Host bookkeeping.
        self.free_slots = list(range(capacity))
        self.free_rows = list(range(max_rows))           # unpacked mode only
        self.slot_rows: dict[int, list[int]] = {}        # rows of a slot, primary (first condition) first
        self.slot_weights: dict[int, list[float]] = {}
        self.row_owner = [-1] * max_rows
        self.n_rows = 0                                  # packed: rows in use are [0, n_rows)
        # Step plan: listed position a -> slot, its rows (-1 padded) and weights; device + host mirror.
        k = MAX_ROWS_PER_SAMPLE
        self.order: list[int] = []                       # position -> slot
        self._position: dict[int, int] = {}              # slot -> position
        self._slots_host = torch.zeros(capacity, dtype=torch.int32)
        self._rows_host = torch.full((capacity, k), -1, dtype=torch.int32)
        self._weights_host = torch.zeros(capacity, k, dtype=torch.float32)
        self.plan_slots = torch.zeros(capacity, **i32)
        self.plan_rows = torch.full((capacity, k), -1, **i32)
        self.plan_weights = torch.zeros(capacity, k, **f32)
        self._plan_dirty = False
        self._upload = _Uploader(self.device)
        # Inpainting: slot -> (known values, keep mask) held fixed through the descent (see ``hold``).
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # One object per update rule (``models.update_rules``); each slot is moved by the rule of its sampler.
        self.rules = rules_for(self)                      # sampler name -> its rule
        self._rule_slots = {rule: set() for rule in dict.fromkeys(self.rules.values())}
        self._rule_of: dict[int, object] = {}
        self.rows_evaluated = 0                          # forward rows (bucket sizes) since creation

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the batch's device. On CUDA through pinned memory and ``non_blocking``: a copy
        from pageable memory may wait for the device, and admissions and releases happen at any step."""
        if self.device.type != "cuda" or t.device.type != "cpu":
            return t.to(self.device)
        return cuda_device.pinned_copy(t, self.device).to(self.device, non_blocking=True)

    # -- membership -----------------------------------------------------------------------------
    def can_admit(self, n_rows: int) -> bool:
        free = self.max_rows - self.n_rows if self.packed else len(self.free_rows)
        return bool(self.free_slots) and free >= n_rows

    def admit(self, x0: torch.Tensor, rows: list[tuple[int, float]], params: SamplerParams,
              hold: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> int:
        """Put one sample in a free slot, starting at ``x0``; returns the slot index.

        ``hold = (known, keep)``: inpainting. Where ``keep`` (broadcastable to the sample, 1 = keep,
        0 = regenerate) is set, the iterate is ``known`` from the start and stays exactly that.
        ``seed``: the sample's noise stream (the Heun SDE sampler draws its increments from it).
        """
        if not self.can_admit(len(rows)):
            raise RuntimeError("no free slot or not enough free rows")
        if len(rows) > MAX_ROWS_PER_SAMPLE:
            raise ValueError(f"a sample has at most {MAX_ROWS_PER_SAMPLE} rows, got {len(rows)}")
        if tuple(x0.shape) != self.sample_shape:
            raise ValueError(f"start latent has shape {tuple(x0.shape)}, expected {self.sample_shape}")
        self.free_slots.sort()
        slot = self.free_slots.pop(0)
        if self.packed:
            row_ids = list(range(self.n_rows, self.n_rows + len(rows)))
            self.n_rows += len(rows)
        else:
            self.free_rows.sort()
            row_ids = [self.free_rows.pop(0) for _ in rows]
            self.n_rows = max(self.n_rows, row_ids[-1] + 1)
        x0 = self.to_device(x0.to(torch.float32))
        if hold is not None:
            known = self.to_device(hold[0].to(torch.float32)).expand(self.sample_shape)
            keep = self.to_device(hold[1].to(torch.float32)).expand(self.sample_shape) > 0.5
            x0 = torch.where(keep, known, x0)
            self.held[slot] = (known, keep)
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
        look = x0.to(self.dtype)      # m = 0, so the first look-ahead is x0 itself
        r0 = row_ids[0]
        if row_ids == list(range(r0, r0 + len(rows))):
            self.model_in[r0:r0 + len(rows)] = look
            self.labels[r0:r0 + len(rows)] = self.to_device(torch.tensor([y for y, _ in rows], dtype=torch.long))
        else:
            for r, (label, _) in zip(row_ids, rows):
                self.model_in[r] = look
                self.labels[r] = label
        for r in row_ids:
            self.row_owner[r] = slot
        self.slot_rows[slot] = row_ids
        self.slot_weights[slot] = [w for _, w in rows]
        self._position[slot] = len(self.order)
        self.order.append(slot)
        self._write_plan(slot)
        rule = self.rules[params.sampler]
        rule.admit(self, slot, params, seed)
        self._rule_slots[rule].add(slot)
        self._rule_of[slot] = rule
        return slot

    def release(self, slot: int) -> None:
        """Free one slot and its rows (packed: the highest rows move into the holes)."""
        self.release_many([slot])

    def release_many(self, slots: Sequence[int]) -> None:
        """Free slots and their rows; with packed rows, refill the holes from the top in one copy."""
        holes: list[int] = []
        for slot in slots:
            rows = self.slot_rows.pop(slot)
            self.slot_weights.pop(slot)
            self.held.pop(slot, None)
            rule = self._rule_of.pop(slot)
            rule.release(slot)
            self._rule_slots[rule].discard(slot)
            for r in rows:
                self.row_owner[r] = -1
            holes += rows
            self.free_slots.append(slot)
            # Swap-remove from the plan: the last listed sample takes this position.
            a = self._position.pop(slot)
            last = self.order.pop()
            if last != slot:
                self.order[a] = last
                self._position[last] = a
                self._write_plan(last)
            self._plan_dirty = True
        if not self.packed:
            self.free_rows.extend(holes)
            self.labels[self.to_device(torch.tensor(holes, dtype=torch.long))] = self.null_label
            self.n_rows = 1 + max((r for rs in self.slot_rows.values() for r in rs), default=-1)
            return
        new_n = self.n_rows - len(holes)
        dst = sorted(h for h in holes if h < new_n)
        src = [r for r in range(new_n, self.n_rows) if self.row_owner[r] >= 0]
        assert len(dst) == len(src), "packed rows out of step"
        if dst:
            for d, s in zip(dst, src):
                owner = self.row_owner[s]
                self.row_owner[d], self.row_owner[s] = owner, -1
                rows = self.slot_rows[owner]
                rows[rows.index(s)] = d
            for owner in {self.row_owner[d] for d in dst}:
                self._write_plan(owner)
            d_idx = self.to_device(torch.tensor(dst, dtype=torch.long))
            s_idx = self.to_device(torch.tensor(src, dtype=torch.long))
            # Whole rows move (same bits, same label): the moved samples' trajectories are unchanged.
            self.model_in.index_copy_(0, d_idx, self.model_in.index_select(0, s_idx))
            self.labels.index_copy_(0, d_idx, self.labels.index_select(0, s_idx))
        self.n_rows = new_n

    def _write_plan(self, slot: int) -> None:
        a, rows, weights = self._position[slot], self.slot_rows[slot], self.slot_weights[slot]
        self._slots_host[a] = slot
        self._rows_host[a] = -1
        self._rows_host[a, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
        self._weights_host[a] = 0.0
        self._weights_host[a, :len(weights)] = torch.tensor(weights, dtype=torch.float32)
        self._plan_dirty = True

    @property
    def occupied(self) -> list[int]:
        return sorted(self.slot_rows)

    # -- one step -------------------------------------------------------------------------------
    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding ``rows`` rows."""
        return next(b for b in self.row_buckets if b >= rows)

    def step(self, slots: Sequence[int] | None = None) -> int:
        """One forward on the rows in use, then each update rule moves its slots (schedule -> run -> update).

        Slots that already finished stay frozen. ``slots`` (a subset of the occupied slots) steps only
        those. Returns the rows the forward ran on.
        """
        full = slots is None or sorted(slots) == self.occupied
        slots = list(self.order) if full else list(slots)
        if not slots:
            return 0
        bucket = self.bucket_for(self.n_rows if full else 1 + max(max(self.slot_rows[s]) for s in slots))
        out = self.forward(self.model_in[:bucket], self.labels[:bucket])       # (bucket, C, H, W)
        out = out.contiguous()   # learn_sigma models return a channel slice; the updates want dense rows
        for rule, members in self._rule_members(slots, full):
            # ``planned``: the rule has every occupied slot in plan order, so the device plan serves.
            rule.update(self, out, members, planned=full and members is self.order)
        if self.held:                 # inpainting: held entries stay known in x and in every evaluated point
            self._apply_holds()
        self.rows_evaluated += bucket
        return bucket

    def _rule_members(self, slots: list[int], full: bool):
        """(rule, its listed slots) for every rule with a slot among ``slots``."""
        for rule, members in self._rule_slots.items():
            if not members:
                continue
            if full and len(members) == len(self.order):
                yield rule, self.order
            else:
                mine = [s for s in slots if s in members]
                if mine:
                    yield rule, mine

    def warm_fused_step(self) -> None:
        """Run the fused step once on scratch state of this batch's shapes and dtypes (one sample, the
        plan's K): on CUDA that compiles and autotunes the kernel before traffic. Batch state is untouched."""
        k = MAX_ROWS_PER_SAMPLE
        f32 = dict(device=self.device, dtype=torch.float32)
        i32 = dict(device=self.device, dtype=torch.int32)
        out = torch.zeros(1, *self.sample_shape, device=self.device, dtype=self.dtype)
        rows = torch.full((1, k), -1, **i32)
        rows[0, 0] = 0
        if not out.is_cuda:
            rows = rows[:, :1].contiguous()   # the CPU path takes only the columns in use
        nag_step(out, torch.zeros(1, *self.sample_shape, **f32), torch.zeros(1, *self.sample_shape, **f32),
                 torch.zeros_like(out), torch.zeros(1, **i32), rows, torch.ones(rows.shape, **f32),
                 torch.ones(1, **f32), torch.zeros(1, **f32), torch.zeros(1, **f32), torch.ones(1, **i32),
                 torch.zeros(1, **i32), torch.zeros(1, **f32), torch.zeros(1, device=self.device, dtype=torch.int8),
                 self.guided_channels, freeze_finished=True)

    def _apply_holds(self) -> None:
        """Put the known values back (iterate and look-ahead rows) and zero their momentum, so a held
        entry never moves: with ``m = 0`` there, the next look-ahead is the known value too."""
        for slot, (known, keep) in self.held.items():
            self.x[slot] = torch.where(keep, known, self.x[slot])
            self.m[slot] = torch.where(keep, torch.zeros_like(known), self.m[slot])
            for r in self.slot_rows[slot]:
                self.model_in[r] = torch.where(keep, known.to(self.dtype), self.model_in[r])

    # -- energies -------------------------------------------------------------------------------
    def energies(self, slots: Sequence[int]) -> torch.Tensor | None:
        """Each slot's energy at its current iterate, on the device: the weighted sum of its rows' energies
        (the energy whose gradient the sample descends); None when the field has no energy."""
        if not self.field.has_energy or not slots:
            return None
        owner, rows, weights = [], [], []
        for i, slot in enumerate(slots):
            for r, w in zip(self.slot_rows[slot], self.slot_weights[slot]):
                owner.append(i)
                rows.append(r)
                weights.append(w)
        owner_idx = self.to_device(torch.tensor(owner, dtype=torch.long))
        slot_idx = self.to_device(torch.tensor(list(slots), dtype=torch.long))
        x = self.x.index_select(0, slot_idx).index_select(0, owner_idx).to(self.dtype)
        y = self.labels.index_select(0, self.to_device(torch.tensor(rows, dtype=torch.long)))
        row_energy = self.field.energy(x, y)                                   # (rows,) float32
        w = self.to_device(torch.tensor(weights, dtype=torch.float32))
        return torch.zeros(len(slots), device=self.device).index_add_(0, owner_idx, w * row_energy)

    # -- status read-back -----------------------------------------------------------------------
    def post_status(self) -> StatusRead:
        """Start reading (steps, norm, finished) of every occupied slot, in plan order.

        On CUDA the values are gathered on the device and copied into pinned memory without waiting;
        ``StatusRead.result()`` waits for that copy only. Elsewhere the read completes at once.
        """
        slots = list(self.order)
        a = len(slots)
        if a == 0:
            return StatusRead([], torch.zeros(3, 0), None)
        idx = self.plan_slots[:a].long()
        if self._plan_dirty:           # no step since the last membership change: read the host plan
            idx = self.to_device(torch.tensor(slots, dtype=torch.long))
        dev = torch.stack([self.steps.index_select(0, idx).float(), self.norm.index_select(0, idx),
                           self.finished.index_select(0, idx).float()])
        if self.device.type != "cuda":
            return StatusRead(slots, dev, None)
        host = cuda_device.pinned_empty((3, a), torch.float32, self.device)
        host.copy_(dev, non_blocking=True)
        return StatusRead(slots, host, cuda_device.record_event(self.device))

    def snapshot(self, slots: list[int]) -> tuple[list[int], list[float], list[bool]]:
        """Steps taken, last gradient norm and finished flag of ``slots`` (one blocking device->host copy)."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        packed = torch.stack([self.steps[idx].float(), self.norm[idx], self.finished[idx].float()]).cpu()
        return packed[0].long().tolist(), packed[1].tolist(), [bool(f) for f in packed[2].tolist()]


@dataclass
class SampleResult:
    latents: torch.Tensor                 # (N, C, H, W) float32, on CPU
    steps: list[int]                      # gradient updates taken by each sample
    grad_norms: list[float]               # last ||g|| of each sample
    stopped_early: list[bool] = field(default_factory=list)   # stopped below its threshold
    energies: list[float] | None = None   # each sample's final energy (lower on data); None: no energy


@torch.no_grad()
def sample(model: torch.nn.Module | GradientField, start: torch.Tensor, conditions: Sequence[Condition],
           params: SamplerParams | Sequence[SamplerParams], *, null_label: int, guided_channels: int,
           dtype: torch.dtype | None = None, progress: Callable[[int, int], None] | None = None,
           stats: dict | None = None, status_lag: int | None = None,
           holds: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
           seeds: Sequence[int] | None = None) -> SampleResult:
    """Run every sample from ``start`` (N, C, H, W) until it stops, in one packed ``SlotBatch``.

    A sample that stops (below its threshold or at its cap) leaves the batch at once, so the
    forward shrinks as samples finish: adaptive stopping saves time, not only evaluations.
    ``stats``, when given, receives ``rows_evaluated`` (forward rows, padding included) and ``nfe``.
    ``status_lag``: steps the status read-back lags (default 1 on CUDA, 0 elsewhere; same results).
    ``model``: a ``GradientField`` (the model seam) or a bare network (its implicit field).
    ``holds``: per sample, ``(known, keep)`` to inpaint (see ``SlotBatch.admit``) or None.
    ``seeds``: each sample's noise stream for the Heun SDE sampler (default 0, 1, 2, ...).
    """
    n = start.shape[0]
    if len(conditions) != n:
        raise ValueError(f"{len(conditions)} conditions given for {n} start latents")
    per_sample = list(params) if isinstance(params, (list, tuple)) else [params] * n
    if len(per_sample) != n:
        raise ValueError(f"{len(per_sample)} sampler settings given for {n} start latents")
    row_sets = [condition_rows(c, null_label) for c in conditions]
    field_ = as_field(model)
    holds = list(holds) if holds is not None else [None] * n
    batch = SlotBatch(field_, capacity=n, max_rows=sum(len(r) for r in row_sets), sample_shape=start.shape[1:],
                      null_label=null_label, guided_channels=guided_channels, device=field_.device,
                      dtype=dtype or field_.dtype)
    latents = start.detach().to(torch.float32).cpu().clone()
    for i, hold in enumerate(holds):
        if hold is not None:
            keep = hold[1].to(torch.float32).expand(latents.shape[1:]) > 0.5
            latents[i] = torch.where(keep, hold[0].to(torch.float32).cpu().expand(latents.shape[1:]), latents[i])
    energies: list[float] | None = [float("nan")] * n if field_.has_energy else None
    steps = [0] * n
    norms = [float("nan")] * n
    owner: dict[int, int] = {}              # slot -> sample index
    for i in range(n):
        if per_sample[i].max_steps > 0:     # a zero budget keeps its start
            owner[batch.admit(start[i], row_sets[i], per_sample[i], hold=holds[i],
                              seed=seeds[i] if seeds is not None else i)] = i
    # Engine steps: a Heun step takes two forwards.
    total = max((p.max_steps * RULES[p.sampler].forwards_per_step for p in per_sample), default=0)
    # On CUDA the status of step k is read after step k+1 is queued (the device never waits for the
    # host); a sample that finished in step k is frozen by the fused step in k+1, so nothing changes.
    lag = (1 if batch.device.type == "cuda" else 0) if status_lag is None else status_lag
    pending: list[StatusRead] = []

    def collect(read: StatusRead) -> None:
        slots, st, nm, fin = read.result()
        live = [(s, k, v, f) for s, k, v, f in zip(slots, st, nm, fin) if s in owner]
        for s, k, v, _ in live:
            steps[owner[s]], norms[owner[s]] = k, v
        done = [s for s, _, _, f in live if f]
        if done:
            latents[[owner[s] for s in done]] = batch.x[done].cpu()
            found = batch.energies(done)
            if found is not None:
                for s, e in zip(done, found.tolist()):
                    energies[owner[s]] = e
            batch.release_many(done)
            for s in done:
                owner.pop(s)

    step = 0
    while batch.order:
        batch.step()
        step += 1
        pending.append(batch.post_status())
        while len(pending) > lag:
            collect(pending.pop(0))
        if not batch.order:
            pending.clear()
        elif step > total + lag:
            raise RuntimeError("sampler: a sample ran past its step cap")   # cannot happen: caps finish samples
        if progress is not None:
            progress(min(step, total), total)
    stopped = [k < p.max_steps for k, p in zip(steps, per_sample)]
    if stats is not None:
        # Evaluations: one per update (two per Heun step), plus the one that found the norm below the threshold.
        nfe = sum(len(r) * (k * RULES[p.sampler].forwards_per_step + int(e))
                  for r, k, e, p in zip(row_sets, steps, stopped, per_sample))
        stats.update(rows_evaluated=batch.rows_evaluated, nfe=nfe)
    if energies is not None and any(p.max_steps == 0 for p in per_sample):
        # A zero step budget never entered the batch: its energy is that of its start.
        zero = [i for i, p in enumerate(per_sample) if p.max_steps == 0]
        for i in zero:
            rows = row_sets[i]
            x = latents[i:i + 1].expand(len(rows), *latents.shape[1:]).to(field_.device, dtype or field_.dtype)
            y = torch.tensor([r for r, _ in rows], device=field_.device)
            e = field_.energy(x, y).cpu()
            energies[i] = float(sum(w * float(v) for (_, w), v in zip(rows, e)))
    return SampleResult(latents=latents, steps=steps, grad_norms=norms, stopped_early=stopped, energies=energies)
