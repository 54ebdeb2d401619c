"""The Euler-Heun SDE step (``models.heun_sde``) for samples inside a running ``SlotBatch``.

A Heun step needs two field evaluations, at ``x`` and at the predictor ``x'``; the batch runs one
forward per engine step, so a Heun sample alternates two phases, one forward each:

- phase 0 (its rows hold ``x``): ``f0`` = its direction. Below its gradient-norm threshold it finishes
  (x kept). Else it stores ``f0`` and ``noise_mid = (g0 + g1)/2 * dW``, and its rows get
  ``x' = x + dt f0 + g0 dW``; phase 1.
- phase 1 (its rows hold ``x'``): ``x <- x + dt/2 (f0 + f1) + noise_mid``, ``steps += 1``; at its cap it
  finishes and ``x`` is clamped to [-1, 1] (the official sampler's last act); its rows get ``x``; phase 0.

So ``steps`` counts Heun steps and each costs two forwards (NFE = 2 per step, honestly). A sample's
time is its own ``steps * dt``, and its noise comes from its seed and step alone, so it joins and
leaves the batch at any engine step and gives the same image whatever shares the batch. The host
mirrors each sample's phase and step count (needed for ``eps(t)`` and the noise); the device masks
finished samples, so a sample stepped once more after it finished (lagging status) does not change.
"""
from __future__ import annotations

import torch

from .heun_sde import HeunSDEParams, diffusion, step_noise


class HeunSlots:
    """The Euler-Heun SDE rule of one ``SlotBatch`` and its per-slot state (see ``models.update_rules``)."""

    forwards_per_step = 2

    def __init__(self, batch):
        capacity, sample_shape, device = batch.capacity, batch.sample_shape, batch.device
        self.sample_shape = sample_shape
        self.device = device
        self.f0 = torch.zeros(capacity, *sample_shape, device=device, dtype=torch.float32)
        self.noise_mid = torch.zeros(capacity, *sample_shape, device=device, dtype=torch.float32)
        self.params: dict[int, HeunSDEParams] = {}
        self.seed: dict[int, int] = {}
        self.phase: dict[int, int] = {}           # host mirror: 0 = rows hold x, 1 = rows hold the predictor
        self.steps: dict[int, int] = {}           # host mirror of Heun steps taken (if not stopped early)

    def admit(self, batch, slot: int, params, seed: int) -> None:
        """``params``: the slot's ``SamplerParams`` (their SDE view, ``heun_params()``)."""
        self.params[slot], self.seed[slot], self.phase[slot], self.steps[slot] = params.heun_params(), int(seed), 0, 0

    def release(self, slot: int) -> None:
        for table in (self.params, self.seed, self.phase, self.steps):
            table.pop(slot, None)

    def __contains__(self, slot: int) -> bool:
        return slot in self.params

    def __bool__(self) -> bool:
        return bool(self.params)

    @torch.no_grad()
    def update(self, batch, out: torch.Tensor, slots: list[int], planned: bool = False) -> None:
        """One phase of every listed Heun slot, from the forward output ``out`` (rows of the batch)."""
        directions = []
        for s in slots:                                            # weighted rows -> one direction per sample
            rows, weights = batch.slot_rows[s], batch.slot_weights[s]
            d = out[rows[0]].float() * weights[0]
            for r, w in zip(rows[1:], weights[1:]):
                d = d + out[r].float() * w
            directions.append(d)
        g = torch.stack(directions)                                # (S, C, H, W)
        idx = batch.to_device(torch.tensor(slots, dtype=torch.long))
        live = batch.finished.index_select(0, idx) == 0            # finished slots stay frozen
        first = [s for s in slots if self.phase[s] == 0]
        second = [s for s in slots if self.phase[s] == 1]
        pos = {s: i for i, s in enumerate(slots)}
        if first:
            self._predict(batch, g, idx, live, first, pos)
        if second:
            self._correct(batch, g, idx, live, second, pos)

    def _predict(self, batch, g, idx, live, first, pos) -> None:
        dev = self.device
        sel = batch.to_device(torch.tensor([pos[s] for s in first], dtype=torch.long))
        slot_idx, f0, ok = idx.index_select(0, sel), g.index_select(0, sel), live.index_select(0, sel)
        norm = f0.flatten(1).norm(dim=1)
        thr = torch.tensor([self.params[s].grad_norm_threshold for s in first], device=dev)
        stop = ok & (norm < thr)
        go = ok & ~stop
        batch.norm.index_copy_(0, slot_idx, torch.where(ok, norm, batch.norm.index_select(0, slot_idx)))
        batch.finished.index_copy_(0, slot_idx, torch.where(stop, torch.ones_like(stop, dtype=torch.int8),
                                                            batch.finished.index_select(0, slot_idx)))
        dt = torch.tensor([self.params[s].dt for s in first], device=dev).view(-1, 1, 1, 1)
        x = batch.x.index_select(0, slot_idx)
        g0 = [diffusion(self.steps[s] * self.params[s].dt, self.params[s]) for s in first]
        g1 = [diffusion((self.steps[s] + 1) * self.params[s].dt, self.params[s]) for s in first]
        predictor = x + dt * f0
        noise_mid = torch.zeros_like(x)
        if any(a > 0 or b > 0 for a, b in zip(g0, g1)):
            dw = torch.stack([step_noise(self.seed[s], self.steps[s], self.sample_shape) * self.params[s].dt ** 0.5
                              for s in first])
            dw = batch.to_device(dw)
            a = torch.tensor(g0, device=dev).view(-1, 1, 1, 1)
            b = torch.tensor(g1, device=dev).view(-1, 1, 1, 1)
            predictor = predictor + a * dw
            noise_mid = 0.5 * (a + b) * dw
        # A sample that stops keeps its iterate, clamped like every final image of this sampler.
        batch.x.index_copy_(0, slot_idx, torch.where(stop.view(-1, 1, 1, 1), x.clamp(-1.0, 1.0), x))
        keep = go.view(-1, 1, 1, 1)
        self.f0.index_copy_(0, slot_idx, torch.where(keep, f0, self.f0.index_select(0, slot_idx)))
        self.noise_mid.index_copy_(0, slot_idx, torch.where(keep, noise_mid, self.noise_mid.index_select(0, slot_idx)))
        self._write_rows(batch, first, torch.where(keep, predictor, x))
        for s in first:
            self.phase[s] = 1

    def _correct(self, batch, g, idx, live, second, pos) -> None:
        dev = self.device
        sel = batch.to_device(torch.tensor([pos[s] for s in second], dtype=torch.long))
        slot_idx, f1, ok = idx.index_select(0, sel), g.index_select(0, sel), live.index_select(0, sel)
        dt = torch.tensor([self.params[s].dt for s in second], device=dev).view(-1, 1, 1, 1)
        x = batch.x.index_select(0, slot_idx)
        new_x = x + 0.5 * dt * (self.f0.index_select(0, slot_idx) + f1) + self.noise_mid.index_select(0, slot_idx)
        steps = batch.steps.index_select(0, slot_idx) + ok.to(batch.steps.dtype)
        cap = torch.tensor([self.params[s].max_steps for s in second], device=dev, dtype=batch.steps.dtype)
        done = ok & (steps >= cap)
        new_x = torch.where(done.view(-1, 1, 1, 1), new_x.clamp(-1.0, 1.0), new_x)
        new_x = torch.where(ok.view(-1, 1, 1, 1), new_x, x)
        batch.x.index_copy_(0, slot_idx, new_x)
        batch.steps.index_copy_(0, slot_idx, steps)
        batch.finished.index_copy_(0, slot_idx, torch.where(done, torch.ones_like(done, dtype=torch.int8),
                                                            batch.finished.index_select(0, slot_idx)))
        self._write_rows(batch, second, new_x)
        for s in second:
            self.phase[s] = 0
            self.steps[s] += 1

    @staticmethod
    def _write_rows(batch, slots: list[int], values: torch.Tensor) -> None:
        """Each slot's rows evaluate ``values[i]`` at the next forward."""
        rows, src = [], []
        for i, s in enumerate(slots):
            for r in batch.slot_rows[s]:
                rows.append(r)
                src.append(i)
        r_idx = batch.to_device(torch.tensor(rows, dtype=torch.long))
        s_idx = batch.to_device(torch.tensor(src, dtype=torch.long))
        batch.model_in.index_copy_(0, r_idx, values.index_select(0, s_idx).to(batch.model_in.dtype))
