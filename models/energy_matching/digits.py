"""The bundled Energy Matching digits model: the 8x8 digits, a small scalar potential, its warm-up training.

Warm-up (the official Algorithm 1, ``--lambda_cd 0 --time_cutoff 1.0``): optimal-transport conditional
flow matching on the potential's velocity. Each batch pairs noise ``x0`` with data ``x1`` by the exact
minibatch OT assignment (squared Euclidean cost; uniform weights of equal-sized batches make the
plan a permutation), draws ``t ~ U(0, 1)``, and regresses ``v(x_t) = -dV/dx (x_t)`` on ``x1 - x0`` at
``x_t = t x1 + (1 - t) x0``. The potential has no time input, so one landscape serves every ``t``;
the loss differentiates through ``dV/dx`` (second-order autograd).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.digits_data import load_digits_split
from models.eqm.digits import TrainConfig, _lr_at, ema_update
from .checkpoint import save_energy_matching
from .network import ARCHITECTURES, EnergyMatchingNet

# Sampler settings recorded in the weights file: the deterministic flow to t = 1 (where flow matching
# put the data), the time a warm-up-only landscape is trained for. dt 0.1 is the knee of its frontier
# (bench/frontier.py, 300 samples): FD 2.53 at 20 NFE per image, dt 0.02 (50 steps) 2.43 at 100 NFE;
# past t = 1 the flow overshoots (t_end 1.5: FD 2.9).
EM_DIGITS_SAMPLER = {"dt": 0.1, "max_steps": 10, "epsilon_max": 0.0, "time_cutoff": 1.0, "grad_norm_threshold": 0.0}
EM_TRAIN = replace(TrainConfig(), steps=700, batch_size=64, lr=1.2e-3, warmup_steps=100, weight_decay=0.0,
                   ema_decay=0.999, threads=1)


def ot_pairs(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Noise reordered so that ``x0[i]`` is paired with ``x1[i]`` by the exact minibatch OT plan."""
    from scipy.optimize import linear_sum_assignment    # scipy comes with scikit-learn, the training data's
    cost = torch.cdist(x0.flatten(1), x1.flatten(1)).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty_like(rows)
    order[cols] = rows
    return x0[torch.from_numpy(order)]


def flow_loss(net: EnergyMatchingNet, x1: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x0 = ot_pairs(torch.randn(x1.shape, generator=gen), x1)
    t = torch.rand(x1.shape[0], 1, 1, 1, generator=gen)
    xt = (t * x1 + (1 - t) * x0).requires_grad_(True)
    (grad,) = torch.autograd.grad(net.potential(xt).sum(), xt, create_graph=True)
    return (-grad - (x1 - x0)).pow(2).mean()


@dataclass
class EMTrainResult:
    ema: EnergyMatchingNet
    losses: list[tuple[int, float]]
    final_loss: float
    seconds: float


def train_em_digits(cfg: TrainConfig = EM_TRAIN, *, log=print, init: EnergyMatchingNet | None = None) -> EMTrainResult:
    """Warm-up training on the digits train split; returns the EMA network (what gets saved).

    ``init``: continue from these weights (a longer warm-up without paying again for its start)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train = load_digits_split().x_train
    net = (deepcopy(init).requires_grad_(True) if init is not None
           else EnergyMatchingNet(ARCHITECTURES["EM-digits"])).train()
    ema = deepcopy(net).eval().requires_grad_(False)
    # The official optimiser: Adam, betas (0.9, 0.95), linear warm-up, gradient clipping at 1.
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    losses, window = [], []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = torch.randint(0, x_train.shape[0], (cfg.batch_size,), generator=gen)
        # Second-order autograd through attention needs the math kernel (the fused CPU one has no double backward).
        with sdpa_kernel(SDPBackend.MATH):
            loss = flow_loss(net, x_train[idx], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, net, step, cfg.ema_decay)
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            losses.append((step + 1, round(float(np.mean(window)), 5)))
            window.clear()
            log(f"step {step + 1}/{cfg.steps}  flow loss {losses[-1][1]:.4f}  lr {_lr_at(step, cfg):.2e}  "
                f"{time.perf_counter() - t0:.0f}s")
    return EMTrainResult(ema=ema, losses=losses, final_loss=losses[-1][1], seconds=time.perf_counter() - t0)


def save_em_digits(result: EMTrainResult, cfg: TrainConfig, weights_path: Path, command: str) -> dict:
    """The EMA weights (safetensors, architecture and sampler settings as metadata) and a json record."""
    extra = {"training_command": command, "training_phase": "warm-up (flow matching, no contrastive term)",
             "train_steps": str(cfg.steps), "final_loss": f"{result.final_loss:.5f}", "weights": "ema"}
    save_energy_matching(result.ema, weights_path, extra=extra, sampler_defaults=EM_DIGITS_SAMPLER)
    record = {"command": command, "phase": "warm-up", "model_config": result.ema.config.to_dict(),
              "train_config": asdict(cfg), "final_loss": result.final_loss, "train_seconds": round(result.seconds, 1),
              "train_device": f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
                              f"{platform.processor() or platform.machine()}",
              "torch": torch.__version__, "sampler_defaults": EM_DIGITS_SAMPLER,
              "loss_log": [{"step": s, "loss": v} for s, v in result.losses]}
    json_path = weights_path.with_suffix(".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, json_path)
    return record


if __name__ == "__main__":       # python -m models.energy_matching.digits [steps]: retrain the bundled weights
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else EM_TRAIN.steps
    cfg = replace(EM_TRAIN, steps=steps)
    out = Path(__file__).resolve().parent / "weights" / "em-digits.safetensors"
    res = train_em_digits(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    save_em_digits(res, cfg, out, f"python -m models.energy_matching.digits {steps}")
    print(f"wrote {out}: {steps} steps in {res.seconds:.0f}s, final flow loss {res.final_loss:.4f}")
