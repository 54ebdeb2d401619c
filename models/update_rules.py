"""The update rules of a ``SlotBatch``: one object per rule behind one small interface.

After each forward the batch hands every rule the slots it moves and the forward output ``out``; the
rule reduces each slot's rows of ``out`` with the slot's weights (``sum_k w_k * out[r_k]``), updates
the batch's state of those slots (``x``, ``m``, ``steps``, ``norm``, ``finished``: a finished slot
stays frozen) and writes the point each slot's rows evaluate next into ``model_in``. The batch never
asks which rule a slot runs: ``SlotBatch.rules[params.sampler]`` is the object that moves it.

- ``FusedDescent``: GD and NAG-GD (``x_look = x + eta*mu*m``; GD is ``mu = 0``, set per slot), all
  slots in one launch of the fused kernel ``kernels.nag_step`` (one forward per step);
- ``HeunSlots`` (``models.heun_slots``): the Euler-Heun SDE of Energy Matching (two forwards per step).
"""
from __future__ import annotations

import torch

from kernels.nag_step import MAX_ROWS_PER_SAMPLE, nag_step
from models.heun_slots import HeunSlots


class FusedDescent:
    """GD and NAG-GD: per-slot step size, momentum, threshold and cap live in the batch's tensors."""

    forwards_per_step = 1

    def __init__(self, batch):
        pass

    def admit(self, batch, slot: int, params, seed: int) -> None:
        pass                            # the batch's per-slot tensors (eta, mu, threshold, cap) are its state

    def release(self, slot: int) -> None:
        pass

    def update(self, batch, out: torch.Tensor, slots: list[int], planned: bool) -> None:
        """One fused step of ``slots``. ``planned``: they are every occupied slot in plan order, so the
        device-resident plan serves (uploaded only when membership changed); else a one-off plan."""
        k = max(len(batch.slot_rows[s]) for s in slots)
        if planned:
            a = len(slots)
            if batch._plan_dirty:
                batch._upload.copy(batch.plan_slots[:a], batch._slots_host[:a])
                batch._upload.copy(batch.plan_rows[:a], batch._rows_host[:a])
                batch._upload.copy(batch.plan_weights[:a], batch._weights_host[:a])
                batch._plan_dirty = False
            slot_ids, rows, weights = batch.plan_slots[:a], batch.plan_rows[:a], batch.plan_weights[:a]
        else:
            # Padded to the plan's width like a full step: on CUDA the kernel then sees one K per latent
            # shape, tuned and compiled in warm-up (``warm_fused_step``), never on live traffic.
            width = MAX_ROWS_PER_SAMPLE
            slot_ids = batch.to_device(torch.tensor(slots, dtype=torch.int32))
            rows = batch.to_device(torch.tensor([batch.slot_rows[s] + [-1] * (width - len(batch.slot_rows[s]))
                                                 for s in slots], dtype=torch.int32))
            weights = batch.to_device(torch.tensor([batch.slot_weights[s] + [0.0] * (width - len(batch.slot_weights[s]))
                                                    for s in slots], dtype=torch.float32))
        self.launch(batch, out, slot_ids, rows, weights, k)

    @staticmethod
    def launch(batch, out: torch.Tensor, slot_ids, rows, weights, k: int) -> None:
        """The fused step on device plan tensors (``rows``/``weights`` of the plan's width)."""
        if not out.is_cuda and rows.shape[1] > k:
            # The CPU path gathers column by column: drop the all-padding columns.
            rows, weights = rows[:, :k].contiguous(), weights[:, :k].contiguous()
        # The kernel indexes rows of ``out``; rows past the bucket are unused, so it gets the same view.
        nag_step(out, batch.x, batch.m, batch.model_in[:out.shape[0]], slot_ids, rows, weights, batch.eta, batch.mu,
                 batch.threshold, batch.max_steps, batch.steps, batch.norm, batch.finished, batch.guided_channels,
                 freeze_finished=True)


# Sampler name -> its rule (a class: each batch makes one object per class).
RULES = {"nag": FusedDescent, "gd": FusedDescent, "heun-sde": HeunSlots}


def rules_for(batch) -> dict[str, object]:
    """One rule object per class for ``batch``, by sampler name."""
    made: dict[type, object] = {}
    for cls in RULES.values():
        if cls not in made:
            made[cls] = cls(batch)
    return {name: made[cls] for name, cls in RULES.items()}
