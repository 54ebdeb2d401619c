"""The only part of the engine that touches the device: model, slot state, fused step, codec.

``execute(output, inputs)`` carries out one ``SchedulerOutput``: frees the slots of samples that
stop before the step (keeping their current iterate), admits new samples into free slots, runs one
forward over the active rows (``SlotBatch`` pads them to a bucket, so shapes come from a small
fixed set) and one fused NAG-GD step, then reads back steps / gradient norm / finished of every
stepped sample in one device->host copy. ``retire(keys)`` hands back the final latents of samples
the scheduler saw finish; ``decode`` turns a batch of latents into uint8 pixels.

Out-of-memory: a forward that runs out of memory is retried in chunks of the next smaller bucket
(``forward_limit``), and that limit stays for later steps, so the worker keeps every running
sample and goes on, slower, instead of dying. Decoding shrinks its chunk the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from models.sampler import SamplerParams, SlotBatch, noise_for_seed, partially_noised
from service.scheduler import SampleKey, SampleStatus, SchedulerOutput

log = logging.getLogger("eqm.runner")


@dataclass
class SampleInput:
    """Everything needed to start one sample (built by the engine from the job spec)."""

    key: SampleKey
    seed: int
    rows: list[tuple[int, float]]          # (label, weight) per model row: ``condition_rows``
    params: SamplerParams
    base: torch.Tensor | None = None       # denoise: the encoded upload (C, H, W); None: start from noise
    noise_level: float | None = None       # denoise: g in g*base + (1-g)*noise_for_seed(seed)


@dataclass
class Stopped:
    """A sample that left before the step: its iterate (None when cancelled) and where it got to."""

    latent: torch.Tensor | None            # (C, H, W) float32 on CPU
    steps: int
    grad_norm: float                       # nan when it never took a step


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
    """Owns the network, the ``SlotBatch`` and the codec of one device."""

    def __init__(self, model: torch.nn.Module, *, codec, null_label: int, guided_channels: int,
                 capacity: int, max_rows: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, row_buckets: Sequence[int] | None = None,
                 forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 decode_batch: int = 32):
        param = next(model.parameters())
        self.model = model
        self.codec = codec
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        cfg = model.config
        self.sample_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.channels = getattr(codec, "channels", 3) if codec.name == "identity" else 3
        self.image_size = cfg.input_size * getattr(codec, "downsample", 1)
        self._model_forward = forward or model
        self.batch = SlotBatch(model, capacity=capacity, max_rows=max_rows, sample_shape=self.sample_shape,
                               null_label=null_label, guided_channels=guided_channels, device=self.device,
                               dtype=self.dtype, row_buckets=row_buckets, forward=self._forward)
        self.forward_limit = max_rows          # largest forward batch known (or assumed) to fit
        self.decode_limit = decode_batch
        self.oom_events = 0
        self._slot: dict[SampleKey, int] = {}

    @classmethod
    def from_loaded(cls, loaded, codec, capacity: int, max_rows: int, **kwargs) -> "ModelRunner":
        """From ``models.checkpoint.load_model``'s result (model already on its device and dtype)."""
        return cls(loaded.model, codec=codec, null_label=loaded.spec.config.null_label,
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
            self._slot[key] = self.batch.admit(self.start_latent(inp), inp.rows, inp.params)
        statuses: dict[SampleKey, SampleStatus] = {}
        bucket = 0
        if output.run:
            slots = [self._slot[k] for k in output.run]
            self.batch.step(slots)
            bucket = self.batch.bucket_for(1 + max(max(self.batch.slot_rows[s]) for s in slots))
            steps, norms, finished = self.batch.snapshot(slots)
            statuses = {k: SampleStatus(st, nm, fin) for k, st, nm, fin in zip(output.run, steps, norms, finished)}
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
                self.batch.release(self._slot.pop(s.key))
        for s in output.stop:
            if not s.started:
                latent = self.start_latent(inputs[s.key]) if s.reason != "cancelled" else None
                stopped[s.key] = Stopped(latent, 0, float("nan"))
        return stopped

    @torch.no_grad()
    def retire(self, keys: Iterable[SampleKey]) -> dict[SampleKey, torch.Tensor]:
        """Final latents (C, H, W) float32 on CPU of finished samples; frees their slots."""
        keys = list(keys)
        if not keys:
            return {}
        slots = [self._slot.pop(k) for k in keys]
        latents = self.batch.x[slots].cpu()
        for s in slots:
            self.batch.release(s)
        return {k: latents[i].clone() for i, k in enumerate(keys)}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) latents -> (N, H, W, C) uint8 pixels, in chunks that fit the device."""
        parts, start = [], 0
        while start < latents.shape[0]:
            chunk = latents[start:start + self.decode_limit]
            try:
                parts.append(self.codec.decode(chunk))
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or self.decode_limit <= 1:
                    raise
                self.decode_limit = max(1, self.decode_limit // 2)
                self._after_oom(f"decode batch shrunk to {self.decode_limit}")
                continue
            start += chunk.shape[0]
        return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.uint8)

    @torch.no_grad()
    def warmup(self) -> None:
        """Run every bucket once before traffic (allocator, kernels, autotuning); state is untouched."""
        for bucket in self.batch.row_buckets:
            self._forward(self.batch.model_in[:bucket], self.batch.labels[:bucket])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- forward with out-of-memory fallback ----------------------------------------------------
    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        while True:
            n, limit = x.shape[0], self.forward_limit
            try:
                if n <= limit:
                    return self._model_forward(x, y)
                # The model is pure, so a half-done chunked forward is simply redone.
                return torch.cat([self._model_forward(x[i:i + limit], y[i:i + limit]) for i in range(0, n, limit)])
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or limit <= 1:
                    raise
                smaller = [b for b in self.batch.row_buckets if b < min(n, limit)]
                self.forward_limit = smaller[-1] if smaller else max(1, min(n, limit) // 2)
                self._after_oom(f"forward batch limited to {self.forward_limit} rows")

    def _after_oom(self, what: str) -> None:
        self.oom_events += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory on %s: %s", self.device, what)
