"""EqM-E on this machine: cost of a step vs the implicit field, the bundled ``digits-e`` (dot energy) against
``digits`` (implicit) on sample quality, OOD detection by energy vs by gradient norm, and inpainting.

    python bench/eval_energy.py [--quick] [--no-write]

Every figure is measured side by side in one run. Quality: an RBF SVM trained on the digits train split
classifies class-conditional samples (the same judge as ``bench/eval_digits.py``). OOD: held-out digits
vs uniform noise, pixel-shuffled digits, inverted, blurred and 90-degree-rotated digits; AUROC of
"higher score = outlier" for the energy (unconditional, lower on data) and for the gradient norm.
Inpainting: held-out digits with the lower half masked, completed with and without the true label;
the completion's class by the classifier and the PSNR of the completed half.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_digits import _auroc, _features, train_classifier  # noqa: E402
from models import resolve_checkpoint  # noqa: E402
from models import load_model  # noqa: E402
from models.eqm.digits import DIGITS_DEFAULTS, load_digits_split  # noqa: E402
from models.eqm.network import EqM, config_for  # noqa: E402
from models.eqm.field import EqMEnergyField, ImplicitField  # noqa: E402
from models.sampler import Condition, noise_for_seed, sample  # noqa: E402
from results import machine_load, median_range, publish  # noqa: E402

TITLE = "## EqM-E: explicit energy (digits-e), OOD by energy, inpainting"


def step_cost(rounds: int) -> list[str]:
    """ms per direction evaluation of 32 rows, implicit vs the same network as an EqM-E dot energy."""
    lines = []
    for name, cfg in (("digits (EqM-Digits/2, 1x8x8)", load_model(resolve_checkpoint("digits")).model.config),
                      ("EqM-S/2 at 4x16x16", config_for("EqM-S/2", input_size=16, num_classes=10))):
        net = EqM(cfg).eval().requires_grad_(False)
        x = torch.randn(32, cfg.in_channels, cfg.input_size, cfg.input_size)
        y = torch.randint(0, cfg.num_classes, (32,))
        fields = {"implicit": ImplicitField(net), "dot": EqMEnergyField(net, "dot")}
        times: dict[str, list[float]] = {k: [] for k in fields}
        with torch.no_grad():
            for _ in range(2):                                  # warm-up
                for f in fields.values():
                    f.direction(x, y)
            for _ in range(rounds):                             # alternating, so load shifts hit both
                for k, f in fields.items():
                    t0 = time.perf_counter()
                    for _ in range(5):
                        f.direction(x, y)
                    times[k].append((time.perf_counter() - t0) / 5 * 1e3)
        ratios = [d / i for d, i in zip(times["dot"], times["implicit"])]
        lines.append(f"| {name} | {median_range(times['implicit'], '{:.2f}')} | {median_range(times['dot'], '{:.2f}')} "
                     f"| {median_range(ratios, '{:.2f}')}x |")
    return lines


def _sample(loaded, start, conds, params, holds=None):
    return sample(loaded.field, start, conds, params, null_label=loaded.model.config.null_label,
                  guided_channels=loaded.spec.guided_channels, holds=holds).latents


def quality(models: dict, clf, per_class: int) -> list[str]:
    labels = np.repeat(np.arange(10), per_class)
    start = torch.stack([noise_for_seed(10_000 + i, (1, 8, 8)) for i in range(len(labels))])
    params = DIGITS_DEFAULTS.adaptive()
    lines = []
    for name, loaded in models.items():
        conds = [Condition((int(y),), cfg_scale=DIGITS_DEFAULTS.cfg_scale) for y in labels]
        t0 = time.perf_counter()
        out = _sample(loaded, start, conds, params)
        acc = float((clf.predict(_features(out)) == labels).mean())
        lines.append(f"| {name} | {acc:.3f} | {len(labels)} | {time.perf_counter() - t0:.1f} |")
    return lines


def ood_sets(x: torch.Tensor) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = x.shape[0]
    shuffled = torch.stack([x[i].flatten()[torch.randperm(64, generator=gen)].reshape(1, 8, 8) for i in range(n)])
    kernel = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel[None, None])
    return {"uniform noise": torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, "pixel-shuffled": shuffled,
            "inverted": -x, "blurred (3x3)": blurred, "rotated 90": torch.rot90(x, 1, (2, 3))}


def ood(models: dict, x_test: torch.Tensor) -> list[str]:
    def scores(loaded, x):
        null = torch.full((x.shape[0],), loaded.model.config.null_label)
        with torch.no_grad():
            d, e = loaded.field.direction_and_energy(x, null)
        return d.flatten(1).norm(dim=1), e

    sets = ood_sets(x_test)
    lines = []
    for name, loaded in models.items():
        norm_in, e_in = scores(loaded, x_test)
        for by in ("energy", "gradient norm"):
            if by == "energy" and e_in is None:
                continue
            row = []
            for outliers in sets.values():
                norm_out, e_out = scores(loaded, outliers)
                row.append(_auroc(e_in, e_out) if by == "energy" else _auroc(norm_in, norm_out))
            lines.append(f"| {name} | {by} | " + " | ".join(f"{a:.3f}" for a in row) + f" | {np.mean(row):.3f} |")
    return lines, list(sets)


def inpainting(models: dict, clf, x_test: torch.Tensor, y_test: torch.Tensor) -> list[str]:
    keep = torch.ones(1, 8, 8)
    keep[:, 4:] = 0                                             # lower half regenerated
    holds = [(x, keep) for x in x_test]
    start = torch.stack([noise_for_seed(20_000 + i, (1, 8, 8)) for i in range(x_test.shape[0])])
    params = DIGITS_DEFAULTS.adaptive()
    lines = []
    for name, loaded in models.items():
        for with_label in (True, False):
            conds = [Condition((int(y),), cfg_scale=DIGITS_DEFAULTS.cfg_scale) if with_label else Condition()
                     for y in y_test]
            out = _sample(loaded, start, conds, params, holds)
            assert torch.equal(out[:, :, :4], x_test[:, :, :4])     # the known half is held exactly
            acc = float((clf.predict(_features(out)) == y_test.numpy()).mean())
            a, b = out[:, :, 4:].clamp(-1, 1), x_test[:, :, 4:]
            mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            psnr = float((10 * torch.log10(4.0 / mse)).mean())
            lines.append(f"| {name} | {'true label' if with_label else 'unconditional'} | {acc:.3f} | {psnr:.2f} |")
    return lines


def run(quick: bool, write: bool) -> str:
    torch.set_num_threads(1)
    load = machine_load()
    t0 = time.perf_counter()
    split = load_digits_split()
    clf = train_classifier(split)
    models = {"digits (implicit)": load_model(resolve_checkpoint("digits")),
              "digits-e (EqM-E dot)": load_model(resolve_checkpoint("digits-e"))}
    n_test = 100 if quick else split.x_test.shape[0]
    x_test, y_test = split.x_test[:n_test], split.y_test[:n_test]
    cost = step_cost(3 if quick else 7)
    qual = quality(models, clf, 5 if quick else 20)
    ood_lines, set_names = ood(models, x_test)
    inp = inpainting(models, clf, x_test, y_test)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    device = f"CPU ({platform.machine()}, 1 torch thread; {load})"
    text = "\n".join([
        TITLE, "",
        f"`python bench/eval_energy.py{' --quick' if quick else ''}`, {date}, {device}; {time.perf_counter() - t0:.0f} s.",
        "",
        "**Cost of a step** (one evaluation of the update direction for 32 rows; ms, median [min-max] of "
        "alternating rounds). Baseline: the implicit field of the same network (one forward). EqM-E adds the "
        "backward to the input (its graph is dropped after the step).", "",
        "| network | implicit ms | EqM-E (dot) ms | EqM-E / implicit |", "|---|---|---|---|", *cost, "",
        f"**Sample quality** (class-conditional samples, the default digits sampler: NAG-GD eta "
        f"{DIGITS_DEFAULTS.params.step_size}, mu {DIGITS_DEFAULTS.params.mu}, CFG {DIGITS_DEFAULTS.cfg_scale}, at most "
        f"{DIGITS_DEFAULTS.params.max_steps} updates, stop below norm {DIGITS_DEFAULTS.grad_norm_threshold}; judged by "
        "an RBF SVM trained on the train split).", "",
        "| model | classifier accuracy | samples | seconds |", "|---|---|---|---|", *qual, "",
        f"**OOD detection** (AUROC, {n_test} held-out digits vs {n_test} of each outlier set; unconditional field; "
        "higher score = outlier: the energy for EqM-E, the gradient norm for both).", "",
        "| model | score | " + " | ".join(set_names) + " | mean |", "|---|---|" + "---|" * (len(set_names) + 1),
        *ood_lines, "",
        f"**Inpainting** ({n_test} held-out digits, lower half masked and regenerated from noise, the digits sampler; "
        "the upper half is held exactly, checked on every image). Class: the SVM on the completed image; PSNR: "
        "the completed half against the true one.", "",
        "| model | condition | classifier accuracy | PSNR of the completed half (dB) |", "|---|---|---|---|", *inp,
    ])
    publish(TITLE, text, write)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and rounds (a smoke run)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    run(args.quick, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
