"""``eqm eval``: judge samples against the held-out digits (FD, precision/recall k=3, accuracy; ``models/judge.py``).

The samples come from a bundled model (or a weights file) with any sampler settings, or from an image
file: ``.npy`` uint8 (N, 8, 8[, C]) as ``eqm sample --images-out`` writes it, or ``.npz`` with ``arr_0``
(the ADM evaluator's layout) and optionally ``labels`` or ``arr_1`` (the requested class per image, -1 = none).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli.threads import add_threads_argument, apply_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="judge samples: FD, precision/recall and accuracy against held-out digits",
                       description="Judge a model's samples (or an image file) against the held-out digits: Frechet "
                                   "distance (FID's formula) and k-NN precision/recall (k=3) in a fixed feature space "
                                   "trained only on the digits train split, and that network's classifier accuracy. "
                                   "The real-vs-real floor and a noise ceiling are printed beside the figures.")
    p.add_argument("--model", default=None, help="bundled model name or weights file (default: digits)")
    p.add_argument("--images", default=None, help=".npy or .npz of images to judge instead of sampling a model")
    p.add_argument("--per-class", type=int, default=60, help="samples per class of a class-conditional model (default 60)")
    p.add_argument("--unconditional", type=int, default=None,
                   help="unconditional samples (default 0, or 600 for a model without classes)")
    p.add_argument("--seed", type=int, default=1000, help="sample i starts from the noise of seed + i")
    s = p.add_argument_group("sampler settings (default: the model's recorded ones)")
    s.add_argument("--sampler", choices=["nag", "gd", "heun-sde"], default=None)
    s.add_argument("--steps", type=int, default=None, help="step cap (max_steps)")
    s.add_argument("--step-size", type=float, default=None, help="eta (dt for the SDE sampler)")
    s.add_argument("--mu", type=float, default=None)
    s.add_argument("--cfg-scale", type=float, default=None)
    s.add_argument("--grad-norm-threshold", type=float, default=None, help="stop a sample below this norm (0 = off)")
    s.add_argument("--epsilon-max", type=float, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    add_threads_argument(p)
    p.set_defaults(handler=run_eval)


def _read_images(path: Path):
    import numpy as np
    from service.cli import UsageError

    if not path.is_file():
        raise UsageError(f"--images {path}: no such file")
    if path.suffix == ".npz":
        with np.load(path) as data:
            key = "arr_0" if "arr_0" in data else "images" if "images" in data else None
            if key is None:
                raise UsageError(f"--images {path}: an .npz needs 'arr_0' (or 'images'); it has {', '.join(data.files)}")
            labels = data["labels"] if "labels" in data else data["arr_1"] if key == "arr_0" and "arr_1" in data else None
            return data[key], labels
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    raise UsageError(f"--images {path}: give an .npy or .npz file")


def run_eval(args: argparse.Namespace) -> int:
    from service.cli import UsageError

    if args.images and args.model:
        raise UsageError("give --model or --images, not both")
    if args.per_class < 0 or (args.unconditional or 0) < 0:
        raise UsageError("--per-class and --unconditional must be >= 0")
    from models import resolve_checkpoint
    model_path = None if args.images else resolve_checkpoint(args.model or "digits")
    # The judge's own network is small; a model's size is read from its file (the worker's rule).
    apply_threads(args.threads, "cpu", model_path, small=True if args.images else None)
    from models.judge import Judge

    judge = Judge.shared()
    report: dict = {"judge": {"held_out_accuracy": round(judge.held_out_accuracy, 3),
                              "reference": f"{len(judge.test_labels)} held-out digits"}}
    if args.images:
        from models.judge import spread
        images, labels = _read_images(Path(args.images))
        judged = len(images)
        images, labels = spread(images, labels)            # as a sampling run's report judges its .npz
        if len(images) < judged:
            report["judged_images"] = f"{len(images)} of {judged}, spread evenly"
        scores = judge.score(images, labels)
        report["source"] = args.images
    else:
        from models import load_model
        from models.judge_runs import draw

        path = model_path
        if not Path(path).is_file():
            raise UsageError(f"--model {args.model}: no bundled model or file of that name")
        loaded = load_model(path)
        has_classes = loaded.field.num_classes > 0
        unconditional = args.unconditional if args.unconditional is not None else (0 if has_classes else 600)
        overrides = {"sampler": args.sampler, "max_steps": args.steps, "step_size": args.step_size, "mu": args.mu,
                     "cfg_scale": args.cfg_scale, "grad_norm_threshold": args.grad_norm_threshold,
                     "epsilon_max": args.epsilon_max}
        drawn = draw(loaded, overrides, per_class=args.per_class if has_classes else 0,
                     unconditional=unconditional, seed=args.seed)
        scores = judge.score(drawn.images, drawn.labels)
        report.update(source=args.model or "digits", settings=drawn.settings,
                      mean_nfe=round(drawn.mean_nfe, 2), mean_steps=round(drawn.mean_steps, 2))
    report.update(samples=scores.row(), floor=judge.floor(scores.count).row(),
                  ceiling=judge.ceiling(scores.count).row())
    if args.json:
        print(json.dumps(report))
        return 0
    print(_table(report))
    return 0


def _table(report: dict) -> str:
    lines = [f"judged {report['source']} against {report['judge']['reference']} "
             f"(judge's own held-out accuracy {report['judge']['held_out_accuracy']:.3f})"]
    if "settings" in report:
        shown = ", ".join(f"{k}={v}" for k, v in report["settings"].items())
        lines.append(f"settings: {shown}; mean NFE per image {report['mean_nfe']}, "
                     f"mean steps {report['mean_steps']}")
    lines.append(f"{'':28}{'FD':>8}{'precision':>11}{'recall':>8}{'accuracy':>10}")
    for name, key in (("samples", "samples"), ("floor (real vs real)", "floor"), ("ceiling (noise)", "ceiling")):
        row = report[key]
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(f"{name + ' (' + str(row['count']) + ')':28}{row['fd']:>8.2f}{row['precision']:>11.3f}"
                     f"{row['recall']:>8.3f}{acc:>10}")
    return "\n".join(lines)
