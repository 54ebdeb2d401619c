"""The bundled Energy Matching digits model: sample quality, NFE and time per image at the official
sampler setting vs with per-sample stopping, and OOD AUROC of V(x) beside EqM's gradient-norm score.

Sampling goes through ``models.sampler.sample`` (the engine's packed slot batch), so a sample that
stops leaves the forward at once. Run: ``python bench/bench_energy_matching.py [--quick] [--no-write]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import results  # noqa: E402
from bench.eval_digits import _auroc, _features  # noqa: E402
from models import resolve_checkpoint  # noqa: E402
from models import load_model  # noqa: E402
from models.eqm.digits import DIGITS_DEFAULTS, load_digits_split  # noqa: E402
from models.sampler import Condition, SamplerParams, noise_for_seed, sample  # noqa: E402

TITLE = "## Energy Matching digits model: quality, NFE and time per image, OOD"
SEED = 5000


def heun(dt_: float, steps: int, eps: float, cutoff: float = 1.0, threshold: float = 0.0) -> SamplerParams:
    return SamplerParams(sampler="heun-sde", step_size=dt_, max_steps=steps, epsilon_max=eps, time_cutoff=cutoff,
                         grad_norm_threshold=threshold)


def quality(clf, latents: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """(class histogram as shares, mean top-class probability, share of images with top probability >= 0.9)."""
    prob = clf.predict_proba(_features(latents))
    top = prob.max(axis=1)
    hist = np.bincount(prob.argmax(axis=1), minlength=10) / len(prob)
    return hist, float(top.mean()), float((top >= 0.9).mean())


def run(quick: bool, write: bool) -> str:
    torch.set_num_threads(1)
    split = load_digits_split()
    from sklearn.svm import SVC
    clf = SVC(C=10.0, gamma="scale", probability=True, random_state=0).fit(_features(split.x_train), split.y_train.numpy())
    test_accuracy = float((clf.predict(_features(split.x_test)) == split.y_test.numpy()).mean())
    em = load_model(resolve_checkpoint("em-digits"))
    eqm = load_model(resolve_checkpoint("digits"))
    field = em.field
    n = 40 if quick else 120
    rounds = 1 if quick else 3
    shape = (1, 8, 8)
    start = torch.stack([noise_for_seed(SEED + i, shape) for i in range(n)])
    seeds = [SEED + i for i in range(n)]
    y0 = torch.zeros(len(split.x_test), dtype=torch.long)
    test_norms = field.direction(split.x_test, y0).flatten(1).norm(dim=1)
    threshold = float(test_norms.median())        # stop once the field is as calm as at a held-out digit
    d = em.spec.sampler_defaults
    settings = {
        "official (t_end 3.25, dt 0.01, eps_max 0.01, cutoff 1.0)": heun(0.01, 325, 0.01),
        f"official + per-sample stopping (‖v‖ < {threshold:.3g}, the median at held-out digits)":
            heun(0.01, 325, 0.01, threshold=threshold),
        f"recorded default (dt {d['step_size']}, {d['max_steps']} steps = t 1.0, deterministic)":
            heun(d["step_size"], d["max_steps"], d["epsilon_max"], d["time_cutoff"]),
    }
    measured: dict[str, dict] = {name: {"seconds": []} for name in settings}
    for _ in range(rounds):                       # alternate the settings round by round
        for name, params in settings.items():
            stats = {}
            t0 = time.perf_counter()
            out = sample(field, start, [Condition()] * n, params, null_label=0, guided_channels=1, seeds=seeds,
                         stats=stats)
            measured[name]["seconds"].append(time.perf_counter() - t0)
            measured[name].update(out=out, stats=stats)
    # EqM, unconditional, its own default sampler: the side-by-side baseline for quality.
    eqm_out = sample(eqm.model, start, [Condition()] * n, DIGITS_DEFAULTS.adaptive(), null_label=eqm.spec.config.null_label,
                     guided_channels=eqm.spec.guided_channels)

    rows = []
    for name, m in measured.items():
        hist, conf, sure = quality(clf, m["out"].latents)
        nfe = m["stats"]["nfe"] / n
        per_image_ms = [1000 * s / n for s in m["seconds"]]
        rows.append(f"| {name} | {np.mean(m['out'].steps):.1f} | {nfe:.1f} | "
                    f"{results.median_range(per_image_ms, '{:.1f}')} | {conf:.3f} | {sure:.2f} | "
                    f"{' '.join(f'{v:.2f}' for v in hist)} |")
    hist, conf, sure = quality(clf, eqm_out.latents)
    rows.append(f"| EqM digits model, unconditional, its default adaptive NAG-GD (baseline) | "
                f"{np.mean(eqm_out.steps):.1f} | {np.mean(eqm_out.steps):.1f} | - | {conf:.3f} | {sure:.2f} | "
                f"{' '.join(f'{v:.2f}' for v in hist)} |")

    # OOD: held-out digits vs uniform noise and pixel-shuffled digits.
    gen = torch.Generator().manual_seed(SEED + 1)
    test = split.x_test
    uniform = torch.rand(test.shape, generator=gen) * 2 - 1
    perms = torch.stack([torch.randperm(64, generator=gen) for _ in range(len(test))])
    shuffled = torch.gather(test.flatten(1), 1, perms).reshape(test.shape)
    null = torch.full((len(test),), eqm.spec.config.null_label, dtype=torch.long)

    def scores(x):
        return {"Energy Matching V(x)": field.energy(x, y0).cpu(),
                "Energy Matching ‖dV/dx‖": field.direction(x, y0).flatten(1).norm(dim=1),
                "EqM ‖f(x, null)‖ (bundled EqM digits)": eqm.model(x, null).flatten(1).norm(dim=1)}
    s_test, s_uni, s_shuf = scores(test), scores(uniform), scores(shuffled)
    ood = [f"| {k} | {_auroc(s_test[k], s_uni[k]):.4f} | {_auroc(s_test[k], s_shuf[k]):.4f} |" for k in s_test]

    today = dt.date.today().isoformat()
    text = "\n".join([
        TITLE, "",
        f"`python bench/bench_energy_matching.py{' --quick' if quick else ''}` — {today}, CPU ({platform.machine()}, "
        f"1 torch thread), {results.machine_load()}. Bundled `em-digits` (warm-up phase only: flow matching of "
        f"-dV/dx, no contrastive term), {n} unconditional samples from the same noise and seeds per setting, through "
        f"the engine's packed slot batch; {rounds} alternating rounds, time per image as median [min-max]. NFE counts "
        "every field evaluation (two per Heun step, plus the one that finds the norm below the threshold). Quality: "
        f"an RBF SVM trained on the train split (held-out accuracy {test_accuracy:.3f}) labels each sample; "
        "confidence = its top-class probability.",
        "",
        "| setting | Heun steps / image | NFE / image | ms / image | mean confidence | share >= 0.9 | class histogram 0..9 |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        f"OOD AUROC ({len(test)} held-out test digits vs as many uniform-noise images and pixel-shuffled test digits; "
        "higher score = more out-of-distribution; 1 = perfect separation, 0.5 = chance):", "",
        "| score | AUROC vs uniform noise | AUROC vs shuffled digits |", "|---|---|---|", *ood,
    ])
    results.publish(TITLE, text, write=write)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="40 samples, one round (a smoke run)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    run(args.quick, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
