"""The only part of the engine that touches the device: model, slot state, fused step, codec.

``execute(output, inputs)`` carries out one ``SchedulerOutput``: frees the slots of samples that
stop before the step (keeping their current iterate), admits new samples into free slots, runs one
forward over the rows in use (``SlotBatch`` keeps them packed in ``[0, n)`` and pads to the smallest
bucket >= n, so shapes come from a small fixed set) and one fused NAG-GD step, then reads back steps
/ gradient norm / finished of every stepped sample in one device->host copy. On CUDA that read lags
one step (``status_lag``): the copy of step k is collected after step k+1 is queued, so the device
never waits for the host; a sample that finished in step k is frozen by the fused step in k+1, so
results are the same as without the lag. ``retire(keys)`` gathers the final latents of samples the
scheduler saw finish (and decodes them, on the device) and frees their slots; on CUDA the copies to
the host are queued without waiting (``Retired.result()`` waits for them), so the engine collects
them after the next step is queued (``emit_lag``): the device is never left idle while the host
encodes images. ``decode`` turns a batch of latents into uint8 pixels.

Device defaults (``model_dtype``): bfloat16 weights on CUDA (tensor cores), float32 elsewhere; the
iterate and momentum stay float32 in every case. Float32 on CUDA turns TF32 matmuls on. The forward
of each bucket can go through ``torch.compile`` (``compile_mode="compile"``) or CUDA graphs
(``"cudagraphs"``); every bucket is warmed up before traffic.

One process, one device: a worker process owns exactly one device. ``claim_device`` makes it the
process's current CUDA device before any other CUDA call (``service.worker.build_engine`` calls it
before loading the model; ``ModelRunner`` calls it again on construction), and every event, pinned
buffer, cache and sync call goes through ``models.device`` with that device named. Two workers never
share a process; several may share a GPU (each its own process).

Out-of-memory: a forward that runs out of memory is retried in chunks of the next smaller bucket
(``forward_limit``), and that limit stays for later steps, so the worker keeps every running
sample and goes on, slower, instead of dying. Decoding shrinks its chunk the same way. Each chunk's
output is copied before the next chunk runs: a CUDA-graph forward returns the same static buffer on
every call, so the next call would overwrite it.

Warm-up (``warmup``) calls every bucket as often as the mode needs before it replays (eager 1,
``compile`` 2, ``cudagraphs`` 3: CUDA-graph trees run a bucket eagerly once, record it on the next
call, replay from the third) and compiles and autotunes the fused step for the batch's shapes. Its
cost is one graph per bucket (``len(row_buckets)``; 27 at 256 rows): it is timed and logged, and the
bucket list is what bounds it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from models import device as cuda_device
from models.device import claim_device
from models.family import GradientField, as_field
from models.sampler import SamplerParams, SlotBatch, noise_for_seed, partially_noised
from service.scheduler import SampleKey, SampleStatus, SchedulerOutput

log = logging.getLogger("eqm.runner")

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
COMPILE_MODES = ("off", "compile", "cudagraphs")
# Calls of one bucket before its forward is in its final form (see the module docstring).
WARMUP_CALLS = {"off": 1, "compile": 2, "cudagraphs": 3}


def model_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The model dtype for a setting: ``auto`` = bfloat16 on CUDA, float32 elsewhere (CPU bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"model dtype must be auto or one of {', '.join(DTYPE_NAMES)}, not {name!r}")
    return DTYPE_NAMES[name]


def configure_device_math(device: str | torch.device, dtype: torch.dtype) -> None:
    """Float32 on CUDA: let matmuls and convolutions use TF32 tensor cores (as the official sampler does)."""
    if torch.device(device).type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compiled_forward(model: torch.nn.Module, mode: str, buckets: int) -> Callable:
    """The forward for ``mode``: eager, ``torch.compile`` per bucket shape, or CUDA graphs per bucket."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    if mode == "off":
        return model
    import torch._dynamo
    # One static graph per bucket: allow that many recompilations of the model's forward.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, buckets + 4)
    if mode == "compile":
        return torch.compile(model, dynamic=False)
    return torch.compile(model, mode="reduce-overhead", dynamic=False)


@dataclass
class SampleInput:
    """Everything needed to start one sample (built by the engine from the job spec)."""

    key: SampleKey
    seed: int
    rows: list[tuple[int, float]]          # (label, weight) per model row: ``condition_rows``
    params: SamplerParams
    base: torch.Tensor | None = None       # denoise: the encoded upload (C, H, W); None: start from noise
    noise_level: float | None = None       # denoise: g in g*base + (1-g)*noise_for_seed(seed)
    hold: tuple[torch.Tensor, torch.Tensor] | None = None   # inpaint: (known, keep) on the latent grid


@dataclass
class Stopped:
    """A sample that left before the step: its iterate (None when cancelled) and where it got to."""

    latent: torch.Tensor | None            # (C, H, W) float32 on CPU
    steps: int
    grad_norm: float                       # nan when it never took a step


class Retired:
    """Final latents (and pixels) of samples retired in one step, on their way to the host.

    On CUDA the copies are queued behind the work of that step and an event marks their end;
    ``result()`` waits for that event only, not for anything queued later. Elsewhere it is ready at once.
    """

    def __init__(self, keys: list[SampleKey], latents: torch.Tensor | None, pixels: torch.Tensor | None,
                 event=None, energies: torch.Tensor | None = None):
        self.keys, self._latents, self._pixels, self._event = keys, latents, pixels, event
        self._energies = energies

    def result(self) -> tuple[dict[SampleKey, torch.Tensor], dict[SampleKey, np.ndarray] | None]:
        """(latent (C, H, W) float32 on CPU by key, uint8 (H, W, C) pixels by key, or None if not decoded)."""
        if not self.keys:
            return {}, None
        if self._event is not None:
            self._event.synchronize()
        latents = {k: self._latents[i].clone() for i, k in enumerate(self.keys)}
        pixels = None if self._pixels is None else {k: self._pixels[i].numpy() for i, k in enumerate(self.keys)}
        return latents, pixels

    def energies(self) -> dict[SampleKey, float]:
        """Final energy by key (lower on data); empty when the model has no energy. After ``result()``."""
        if self._energies is None:
            return {}
        return {k: float(e) for k, e in zip(self.keys, self._energies.tolist())}


@dataclass
class RunnerOutput:
    statuses: dict[SampleKey, SampleStatus]
    stopped: dict[SampleKey, Stopped]
    rows_evaluated: int                    # active rows (the NFE of this step)
    bucket_rows: int                       # rows the forward ran on (active + padding)


def is_out_of_memory(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or "out of memory" in str(exc).lower()


class ModelRunner:
    """Owns the model (through the family seam), the ``SlotBatch`` and the codec of one device."""

    def __init__(self, model: torch.nn.Module | GradientField, *, codec, null_label: int, guided_channels: int,
                 capacity: int, max_rows: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, row_buckets: Sequence[int] | None = None,
                 forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 decode_batch: int = 32, packed: bool = True, status_lag: int | None = None,
                 compile_mode: str = "off"):
        self.field = as_field(model)
        self.model = self.field.network
        param = next(self.model.parameters())
        claim_device(device if device is not None else param.device)
        self.codec = codec
        self.device = torch.device(device) if device is not None else self.field.device
        self.dtype = dtype or self.field.dtype
        self.sample_shape = tuple(self.field.sample_shape)
        self.channels = getattr(codec, "channels", 3) if codec.name == "identity" else 3
        self.image_size = self.sample_shape[-1] * getattr(codec, "downsample", 1)
        self.batch = SlotBatch(self.field, capacity=capacity, max_rows=max_rows, sample_shape=self.sample_shape,
                               null_label=null_label, guided_channels=guided_channels, device=self.device,
                               dtype=self.dtype, row_buckets=row_buckets, forward=self._forward, packed=packed)
        # The network call (eager or compiled) sits under the family: an explicit family differentiates it.
        self.field.use_forward(forward or compiled_forward(self.model, compile_mode, len(self.batch.row_buckets)))
        self._model_forward = self.field.direction
        self.compile_mode = compile_mode
        self.warmup_seconds: float | None = None
        # Status read-back lag in steps: 1 on CUDA (the device never waits for the host), else 0.
        self.status_lag = (1 if self.device.type == "cuda" else 0) if status_lag is None else status_lag
        self._pending: list[tuple[list[SampleKey], object]] = []
        self.forward_limit = max_rows          # largest forward batch known (or assumed) to fit
        self.decode_limit = decode_batch
        self.oom_events = 0
        self._slot: dict[SampleKey, int] = {}

    @property
    def emit_lag(self) -> int:
        """Steps after its retire that the engine collects a ``Retired``: the status lag (same reason)."""
        return self.status_lag

    @classmethod
    def from_loaded(cls, loaded, codec, capacity: int, max_rows: int, **kwargs) -> "ModelRunner":
        """From ``models.load_model``'s result (model already on its device and dtype)."""
        return cls(loaded.field, codec=codec, null_label=loaded.spec.config.null_label,
                   guided_channels=loaded.spec.guided_channels, capacity=capacity, max_rows=max_rows, **kwargs)

    @property
    def capacity(self) -> int:
        return self.batch.capacity

    @property
    def max_rows(self) -> int:
        return self.batch.max_rows

    # -- starts ---------------------------------------------------------------------------------
    def encode_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """One (H, W, C) uint8 image -> its start latent (C, H', W') float32 on CPU."""
        return self.codec.encode(pixels[None])[0].float().cpu()

    def start_latent(self, inp: SampleInput) -> torch.Tensor:
        if inp.base is None:
            return noise_for_seed(inp.seed, self.sample_shape)
        if inp.noise_level is None:
            return inp.base
        return partially_noised(inp.base, inp.noise_level, noise_for_seed(inp.seed, self.sample_shape))

    # -- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, output: SchedulerOutput, inputs: Mapping[SampleKey, SampleInput]) -> RunnerOutput:
        stopped = self._stop(output, inputs)
        for key in output.admit:
            inp = inputs[key]
            self._slot[key] = self.batch.admit(self.start_latent(inp), inp.rows, inp.params, hold=inp.hold,
                                               seed=inp.seed)
        statuses: dict[SampleKey, SampleStatus] = {}
        bucket = 0
        if not output.run:
            self._pending.clear()          # nothing is held: earlier reads concern samples that left
        else:
            assert len(output.run) == len(self.batch.order), "scheduler and runner disagree on the running set"
            bucket = self.batch.step()
            read = self.batch.post_status()
            key_of = {slot: key for key, slot in self._slot.items()}
            self._pending.append(([key_of[s] for s in read.slots], read))
            while len(self._pending) > self.status_lag:
                keys, read = self._pending.pop(0)
                _, steps, norms, finished = read.result()
                for k, st, nm, fin in zip(keys, steps, norms, finished):
                    if k in self._slot:    # still held (not cancelled or past its deadline since)
                        statuses[k] = SampleStatus(st, nm, fin)
        return RunnerOutput(statuses, stopped, rows_evaluated=output.rows, bucket_rows=bucket)

    def _stop(self, output: SchedulerOutput, inputs: Mapping[SampleKey, SampleInput]) -> dict[SampleKey, Stopped]:
        stopped: dict[SampleKey, Stopped] = {}
        held = [s for s in output.stop if s.started]
        if held:
            slots = [self._slot[s.key] for s in held]
            steps, norms, _ = self.batch.snapshot(slots)
            latents = self.batch.x[slots].cpu()
            for i, s in enumerate(held):
                keep = s.reason != "cancelled"
                stopped[s.key] = Stopped(latents[i].clone() if keep else None, steps[i], norms[i])
                self._slot.pop(s.key)
            self.batch.release_many(slots)
        for s in output.stop:
            if not s.started:
                latent = self.start_latent(inputs[s.key]) if s.reason != "cancelled" else None
                stopped[s.key] = Stopped(latent, 0, float("nan"))
        return stopped

    @torch.no_grad()
    def retire(self, keys: Iterable[SampleKey], decode: bool = True) -> Retired:
        """Free the slots of finished samples, gathering their final latents (and, with ``decode``, their
        pixels) on the device first; on CUDA the copies to pinned host memory are queued, not waited for.
        A finished sample's iterate is frozen by the fused step, so a step queued before this changes nothing."""
        keys = list(keys)
        if not keys:
            return Retired([], None, None)
        slots = [self._slot.pop(k) for k in keys]
        # Gathered before the slots are freed, so ahead of any later write to them.
        latents = self.batch.x.index_select(0, self.batch.to_device(torch.tensor(slots, dtype=torch.long)))
        energies = self.batch.energies(slots)          # None for a family without an energy
        pixels = self.decode_tensor(latents) if decode else None
        self.batch.release_many(slots)
        if self.device.type != "cuda":
            return Retired(keys, latents, None if pixels is None else pixels.cpu(),
                           energies=None if energies is None else energies.cpu())

        def to_pinned(t: torch.Tensor) -> torch.Tensor:
            return cuda_device.pinned_empty(t.shape, t.dtype, self.device).copy_(t, non_blocking=True)

        host_latents, host_pixels = to_pinned(latents), None if pixels is None else to_pinned(pixels)
        host_energies = None if energies is None else to_pinned(energies)
        return Retired(keys, host_latents, host_pixels, cuda_device.record_event(self.device), energies=host_energies)

    @torch.no_grad()
    def preview_pixels(self, keys: Iterable[SampleKey]) -> dict[SampleKey, np.ndarray]:
        """The current iterate of running samples as (H, W, C) uint8 previews (the codec's cheap decode)."""
        keys = [k for k in keys if k in self._slot]
        if not keys:
            return {}
        idx = self.batch.to_device(torch.tensor([self._slot[k] for k in keys], dtype=torch.long))
        pixels = self.codec.preview_tensor(self.batch.x.index_select(0, idx)).cpu().numpy()
        return dict(zip(keys, pixels))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) latents -> (N, H, W, C) uint8 pixels on the host."""
        if latents.shape[0] == 0:
            return np.zeros((0,), dtype=np.uint8)
        return self.decode_tensor(latents).cpu().numpy()

    @torch.no_grad()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) latents -> (N, H, W, C) uint8 pixels on the codec's device, in chunks that fit it."""
        parts, start = [], 0
        while start < latents.shape[0]:
            chunk = latents[start:start + self.decode_limit]
            try:
                parts.append(self.codec.decode_tensor(chunk))
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or self.decode_limit <= 1:
                    raise
                self.decode_limit = max(1, self.decode_limit // 2)
                self._after_oom(f"decode batch shrunk to {self.decode_limit}")
                continue
            start += chunk.shape[0]
        return torch.cat(parts)

    @torch.no_grad()
    def warmup(self) -> float:
        """Bring every bucket's forward and the fused step to their final form before traffic (see the
        module docstring); state is untouched. Returns the seconds it took (also ``warmup_seconds``)."""
        start = time.perf_counter()
        calls = WARMUP_CALLS.get(self.compile_mode, 1)
        for bucket in self.batch.row_buckets:
            for _ in range(calls):
                self._forward(self.batch.model_in[:bucket], self.batch.labels[:bucket])
        self.batch.warm_fused_step()
        cuda_device.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - start
        log.info("warm-up on %s: %d buckets x %d calls (%s) in %.1f s", self.device, len(self.batch.row_buckets),
                 calls, self.compile_mode, self.warmup_seconds)
        return self.warmup_seconds

    # -- forward with out-of-memory fallback ----------------------------------------------------
    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        while True:
            n, limit = x.shape[0], self.forward_limit
            try:
                if n <= limit:
                    return self._call_model(x, y)
                # The model is pure, so a half-done chunked forward is simply redone. Each chunk is copied
                # out before the next call, which may reuse the same output buffer (CUDA graphs).
                return torch.cat([self._call_model(x[i:i + limit], y[i:i + limit]).clone()
                                  for i in range(0, n, limit)])
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or limit <= 1:
                    raise
                smaller = [b for b in self.batch.row_buckets if b < min(n, limit)]
                self.forward_limit = smaller[-1] if smaller else max(1, min(n, limit) // 2)
                self._after_oom(f"forward batch limited to {self.forward_limit} rows")

    def _call_model(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.compile_mode == "cudagraphs":
            # Each forward starts a new step of the CUDA-graph tree: one graph per bucket, replayed
            # whatever bucket ran before (without it a graph is recorded per sequence of buckets),
            # and an earlier step's output buffer may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        return self._model_forward(x, y)

    def _after_oom(self, what: str) -> None:
        self.oom_events += 1
        cuda_device.empty_cache(self.device)
        log.warning("out of memory on %s: %s", self.device, what)
