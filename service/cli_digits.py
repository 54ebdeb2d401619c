"""``eqm train-digits`` (train the bundled 8x8 digits EqM) and ``eqm eval-digits`` (its quality report)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL_SCRIPT = ROOT / "bench" / "eval_digits.py"


def register(sub: argparse._SubParsersAction) -> None:
    from models.digits import TrainConfig
    from models import BUNDLED

    defaults = TrainConfig()
    t = sub.add_parser("train-digits", help="train the bundled EqM on scikit-learn's 8x8 digits (CPU, minutes)",
                       description="Train a small pixel-space EqM on the train split of scikit-learn's digits "
                                   "(stratified 80/20, seed 0) and save its EMA weights plus a training record.")
    t.add_argument("--steps", type=int, default=defaults.steps, help=f"optimiser steps (default {defaults.steps})")
    t.add_argument("--batch-size", type=int, default=defaults.batch_size)
    t.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    t.add_argument("--seed", type=int, default=defaults.seed, help="training seed (the data split is fixed)")
    t.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (0 = all cores)")
    t.add_argument("--log-every", type=int, default=defaults.log_every, help="print the mean loss every N steps")
    t.add_argument("--out", default=str(BUNDLED["digits"]), help="weights file (.safetensors)")
    t.add_argument("--record", default=None, help="training record (.json; default: next to --out)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (loss lines only)")
    t.set_defaults(handler=run_train)

    e = sub.add_parser("eval-digits", help="quality report of the digits model (writes bench/RESULTS.md)",
                       description="Measure the digits model on the held-out test split: classifier accuracy of "
                                   "samples, adaptive stopping, composition, denoising PSNR and OOD AUROC.")
    _eval_module_args(e)
    e.set_defaults(handler=run_eval)


def _eval_module_args(parser: argparse.ArgumentParser) -> None:
    # The report lives in bench/ (not an installed package); without the source tree the command says so.
    if EVAL_SCRIPT.is_file():
        _load_eval().add_arguments(parser)


def _load_eval():
    from service.cli import UsageError
    if not EVAL_SCRIPT.is_file():
        raise UsageError(f"{EVAL_SCRIPT}: not found (eval-digits runs from the source tree)")
    if "eval_digits" in sys.modules:
        return sys.modules["eval_digits"]
    spec = importlib.util.spec_from_file_location("eval_digits", EVAL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_digits"] = module
    spec.loader.exec_module(module)
    return module


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.digits import TrainConfig, save_digits_model, train_digits
    from service.cli import UsageError

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: the weights file must end in .safetensors")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    record_path = Path(args.record) if args.record else out.with_suffix(".json")
    cfg = replace(TrainConfig(), steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  threads=args.threads, log_every=args.log_every,
                  warmup_steps=min(TrainConfig().warmup_steps, max(1, args.steps // 10)))
    # The record holds the canonical command that reproduces these weights, whatever was typed.
    command = (f"eqm train-digits --steps {cfg.steps} --batch-size {cfg.batch_size} --lr {cfg.lr} "
               f"--seed {cfg.seed} --threads {cfg.threads}")
    result = train_digits(cfg, progress=not args.no_progress,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    record = save_digits_model(result, cfg, out, record_path, command)
    print(f"wrote {out} ({record['file_bytes'] / 1e6:.2f} MB) and {record_path}: {cfg.steps} steps in "
          f"{result.seconds:.0f} s, final loss {result.final_loss:.4f}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    return _load_eval().run(args)
