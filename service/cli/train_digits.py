"""``eqm train-digits``: train the bundled 8x8 digits EqM on scikit-learn's digits (CPU, minutes).

The defaults are the setting that made the bundled weights, read from their training record (json,
so ``--help`` needs no torch); ``models.eqm.digits.TrainConfig`` fills any the record lacks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from models import BUNDLED


def _defaults() -> SimpleNamespace:
    """The bundled weights' training setting, from their record (None where it says nothing)."""
    try:
        record = json.loads(BUNDLED["digits"].with_suffix(".json").read_text(encoding="utf-8"))["train_config"]
    except (OSError, ValueError, KeyError):
        record = {}
    names = ("steps", "batch_size", "lr", "seed", "threads", "log_every")
    return SimpleNamespace(**{n: record.get(n) for n in names})


def register(sub: argparse._SubParsersAction) -> None:
    defaults = _defaults()
    t = sub.add_parser("train-digits", help="train the bundled EqM on scikit-learn's 8x8 digits (CPU, minutes)",
                       description="Train a small pixel-space EqM on the train split of scikit-learn's digits "
                                   "(stratified 80/20, seed 0) and save its EMA weights plus a training record.")
    t.add_argument("--steps", type=int, default=defaults.steps, help=f"optimiser steps (default {defaults.steps})")
    t.add_argument("--batch-size", type=int, default=defaults.batch_size)
    t.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    t.add_argument("--seed", type=int, default=defaults.seed, help="training seed (the data split is fixed)")
    t.add_argument("--threads", type=int, default=defaults.threads,
                   help=f"torch CPU threads (default {defaults.threads}: as for every small model on a CPU, more "
                        "threads only slow it, bench/RESULTS.md; 0 = torch's default, every core)")
    t.add_argument("--log-every", type=int, default=defaults.log_every, help="print the mean loss every N steps")
    t.add_argument("--ebm", choices=["none", "dot", "l2", "mean"], default="none",
                   help="energy form: none = implicit EqM (the bundled 'digits'); dot = EqM-E, the direction is "
                        "the gradient of E = sum(f(x) * x) (the bundled 'digits-e'); default none")
    t.add_argument("--out", default=None, help="weights file (.safetensors; default: digits.safetensors in the "
                   "current folder, digits-e.safetensors with --ebm; the bundled weights are replaced only when "
                   "named, e.g. --out models/weights/digits.safetensors); load it with --checkpoint FILE")
    t.add_argument("--record", default=None, help="training record (.json; default: next to --out)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (loss lines only)")
    t.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.eqm.digits import TrainConfig, save_digits_model, train_digits
    from service.cli import UsageError

    for name, value in vars(TrainConfig()).items():        # flags the record did not give a default
        if getattr(args, name, 0) is None:
            setattr(args, name, value)
    # A user's experiment never overwrites the shipped model unless --out names it.
    out = Path(args.out or BUNDLED["digits" if args.ebm == "none" else "digits-e"].name)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: the weights file must end in .safetensors")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    record_path = Path(args.record) if args.record else out.with_suffix(".json")
    cfg = replace(TrainConfig(), steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  threads=args.threads, log_every=args.log_every, ebm=args.ebm,
                  warmup_steps=min(TrainConfig().warmup_steps, max(1, args.steps // 10)))
    # The record holds the canonical command that reproduces these weights, whatever was typed.
    command = (f"eqm train-digits --steps {cfg.steps} --batch-size {cfg.batch_size} --lr {cfg.lr} "
               f"--seed {cfg.seed} --threads {cfg.threads}" + (f" --ebm {cfg.ebm}" if cfg.ebm != "none" else ""))
    result = train_digits(cfg, progress=not args.no_progress,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    record = save_digits_model(result, cfg, out, record_path, command)
    print(f"wrote {out} ({record['file_bytes'] / 1e6:.2f} MB) and {record_path}: {cfg.steps} steps in "
          f"{result.seconds:.0f} s, final loss {result.final_loss:.4f}")
    return 0
