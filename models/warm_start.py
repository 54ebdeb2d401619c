"""Retrain the bundled energy models from trained weights instead of from scratch.

- ``digits-e``: EqM-E (dot energy) shares every tensor with the implicit ``digits`` network, so its
  training starts from the trained implicit weights and only has to turn a direction field into the
  gradient of ``E = sum(f(x) * x)``; the double backward that makes each EqM-E step ~3x dearer is paid
  for a short fine-tune, not for a whole run.
- ``em-digits``: the Energy Matching warm-up (flow matching on ``-dV/dx``) continued from the shipped
  weights: a longer first phase without paying again for its start.

``python -m models.warm_start digits-e --steps 1500 [--out FILE]`` (the weights' records hold the command).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from . import BUNDLED


def finetune_digits_e(steps: int, lr: float, batch_size: int, out: Path) -> None:
    from models.eqm.checkpoint import load_model
    from models.eqm.digits import TrainConfig, save_digits_model, train_digits

    start = load_model(BUNDLED["digits"]).model
    cfg = replace(TrainConfig(), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                  threads=1, ebm="dot", seed=1)
    result = train_digits(cfg, progress=False, log=lambda m: print(m, file=sys.stderr, flush=True), init=start)
    command = f"python -m models.warm_start digits-e --steps {steps} --lr {lr} --batch-size {batch_size}"
    save_digits_model(result, cfg, out, out.with_suffix(".json"), command)
    print(f"wrote {out}: {steps} steps from the implicit digits weights in {result.seconds:.0f}s, "
          f"final loss {result.final_loss:.4f}")


def continue_em_digits(steps: int, lr: float, batch_size: int, out: Path) -> None:
    from models.energy_matching.checkpoint import load_energy_matching
    from models.energy_matching.digits import EM_TRAIN, save_em_digits, train_em_digits

    start = load_energy_matching(BUNDLED["em-digits"]).network
    cfg = replace(EM_TRAIN, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20), seed=1)
    result = train_em_digits(cfg, log=lambda m: print(m, file=sys.stderr, flush=True), init=start)
    command = f"python -m models.warm_start em-digits --steps {steps} --lr {lr} --batch-size {batch_size}"
    save_em_digits(result, cfg, out, command)
    print(f"wrote {out}: {steps} more warm-up steps in {result.seconds:.0f}s, final flow loss {result.final_loss:.4f}")


def restamp_defaults(weights_path: Path, defaults: dict) -> None:
    """Record new sampler defaults in a weights file and its json record, tensors untouched (atomic)."""
    import json
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights_path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta["sampler_defaults"] = json.dumps(defaults)
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, weights_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.warm_start", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["digits-e", "em-digits"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="weights file (default: the bundled one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out) if args.out else BUNDLED[args.model]
    run = finetune_digits_e if args.model == "digits-e" else continue_em_digits
    run(args.steps, args.lr, args.batch_size, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
