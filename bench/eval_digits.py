"""Quality report of the bundled digits EqM on the held-out test split; writes its section of bench/RESULTS.md."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                      # `python bench/eval_digits.py` from anywhere
    sys.path.insert(0, str(ROOT))

from models import resolve_checkpoint  # noqa: E402
from models import load_model  # noqa: E402
from models.family import LoadedModel  # noqa: E402
from models.codecs import IdentityCodec  # noqa: E402
from models.eqm.digits import DIGITS_DEFAULTS, DigitsSamplerDefaults, DigitsSplit, load_digits_split  # noqa: E402
from models.sampler import Condition, SamplerParams, noise_for_seed, partially_noised, sample  # noqa: E402
from bench import results  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
GRID_PATH = ROOT / "bench" / "digits_samples.png"
SECTION_TITLE = "## Digits model quality"
COMPOSITION_PAIRS = ((0, 6), (1, 7), (3, 8), (4, 9), (2, 3), (5, 9))
DENOISE_LEVEL = 0.5
GRID_COLUMNS = 10
GRID_SCALE = 8


@dataclass(frozen=True)
class EvalConfig:
    """How much to measure; ``quick()`` is the seconds-long CI smoke setting."""

    checkpoint: str = "digits"
    per_class: int = 50
    per_pair: int = 50
    denoise_count: int = 0                 # 0 = the whole test split
    ood_count: int = 0                     # 0 = the whole test split
    seed: int = 1000                       # noise seeds seed, seed+1, ... (training used seed 0)
    defaults: DigitsSamplerDefaults = DIGITS_DEFAULTS
    threads: int = 0
    grid_path: Path | None = GRID_PATH       # None: no PNG (the quick smoke run leaves the measured one alone)

    def quick(self) -> "EvalConfig":
        return replace(self, per_class=3, per_pair=3, denoise_count=30, ood_count=60, grid_path=None)


@dataclass
class Report:
    """Every measured figure, plus how long the run took."""

    classifier_name: str = ""
    classifier_accuracy: float = 0.0
    fixed_accuracy: float = 0.0
    fixed_steps: float = 0.0
    per_class_accuracy: list[float] = field(default_factory=list)
    adaptive_accuracy: float = 0.0
    adaptive_steps: float = 0.0
    composition: dict[tuple[int, int], tuple[float, float, float]] = field(default_factory=dict)
    psnr_noised: float = 0.0
    psnr_uncond: float = 0.0
    psnr_label: float = 0.0
    psnr_uncond_fixed: float = 0.0
    denoise_steps: float = 0.0
    denoise_count: int = 0
    ood_count: int = 0
    auroc_uniform: float = 0.0
    auroc_shuffled: float = 0.0
    norm_test: float = 0.0
    norm_uniform: float = 0.0
    norm_shuffled: float = 0.0
    samples: int = 0
    seconds: float = 0.0

    @property
    def composition_mean(self) -> float:
        return float(np.mean([v[0] for v in self.composition.values()])) if self.composition else 0.0

    @property
    def step_saving(self) -> float:
        return 1.0 - self.adaptive_steps / self.fixed_steps if self.fixed_steps else 0.0


def train_classifier(split: DigitsSplit):
    """An RBF SVM on the train split: independent of EqM, it judges what the samples look like."""
    from sklearn.svm import SVC
    clf = SVC(C=10.0, gamma="scale")
    clf.fit(_features(split.x_train), split.y_train.numpy())
    return clf


def _features(x: torch.Tensor) -> np.ndarray:
    # Samples go through the codec's uint8 round trip first, so the classifier sees what a user gets.
    codec = IdentityCodec(1, x.shape[-1])
    return codec.encode(codec.decode(x)).reshape(x.shape[0], -1).numpy()


def _noise(seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([noise_for_seed(seed + i, shape) for i in range(n)])


def _run(loaded: LoadedModel, start: torch.Tensor, conditions: list[Condition], params: SamplerParams):
    cfg = loaded.model.config
    return sample(loaded.model, start, conditions, params, null_label=cfg.null_label,
                  guided_channels=loaded.spec.guided_channels)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR on [-1, 1] images (peak-to-peak 2, the same as 255 on uint8), both clamped."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10.0 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def gradient_norms(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """||f(x, null)||_2 per image: how far the unconditional field says x is from equilibrium."""
    null = torch.full((x.shape[0],), loaded.model.config.null_label, dtype=torch.long)
    return loaded.model(x, null).flatten(1).norm(dim=1)


def evaluate(cfg: EvalConfig, *, log=print) -> Report:
    """Measure every figure of the report; sampling all goes through ``models.sampler.sample``."""
    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    defaults = cfg.defaults
    report = Report()
    split = load_digits_split()
    loaded = load_model(resolve_checkpoint(cfg.checkpoint))
    shape = tuple(split.x_test.shape[1:])
    classes = loaded.model.config.num_classes

    clf = train_classifier(split)
    report.classifier_name = "SVC(rbf, C=10)"
    report.classifier_accuracy = float((clf.predict(_features(split.x_test)) == split.y_test.numpy()).mean())
    log(f"classifier test accuracy {report.classifier_accuracy:.4f}")

    # Class-conditional: the same noise for the fixed and the adaptive run, so only stopping differs.
    labels = np.repeat(np.arange(classes), cfg.per_class)
    start = _noise(cfg.seed, len(labels), shape)
    conditions = [Condition(labels=(int(y),), cfg_scale=defaults.cfg_scale) for y in labels]
    fixed = _run(loaded, start, conditions, defaults.params)
    predicted = clf.predict(_features(fixed.latents))
    report.fixed_accuracy = float((predicted == labels).mean())
    report.fixed_steps = float(np.mean(fixed.steps))
    report.per_class_accuracy = [float((predicted[labels == c] == c).mean()) for c in range(classes)]
    report.samples = len(labels)
    log(f"class-conditional accuracy {report.fixed_accuracy:.4f} ({len(labels)} samples, {report.fixed_steps:.0f} steps)")
    if cfg.grid_path is not None:
        save_grid(fixed.latents, labels, cfg.grid_path, min(GRID_COLUMNS, cfg.per_class))

    adaptive = _run(loaded, start, conditions, defaults.adaptive())
    report.adaptive_accuracy = float((clf.predict(_features(adaptive.latents)) == labels).mean())
    report.adaptive_steps = float(np.mean(adaptive.steps))
    log(f"adaptive: accuracy {report.adaptive_accuracy:.4f}, mean steps {report.adaptive_steps:.1f}")

    # Composition: each sample is conditioned on both labels of a pair (mean of the two fields).
    pair_conditions, pair_index = [], []
    for i, pair in enumerate(COMPOSITION_PAIRS):
        pair_conditions += [Condition(labels=pair, cfg_scale=defaults.composition_cfg_scale)] * cfg.per_pair
        pair_index += [i] * cfg.per_pair
    composed = _run(loaded, _noise(cfg.seed + 100_000, len(pair_conditions), shape), pair_conditions,
                    defaults.params)
    predicted = clf.predict(_features(composed.latents))
    pair_index = np.array(pair_index)
    for i, (a, b) in enumerate(COMPOSITION_PAIRS):
        got = predicted[pair_index == i]
        report.composition[(a, b)] = (float(np.isin(got, (a, b)).mean()), float((got == a).mean()),
                                      float((got == b).mean()))
    log(f"composition: {report.composition_mean:.4f} in one of the two labels")

    # Denoising: test digits at g = 0.5, then descent from there. The headline run is unconditional with the
    # default adaptive sampler: descent that stops at equilibrium; longer fixed descent drifts to a prototype.
    n_den = cfg.denoise_count or split.x_test.shape[0]
    clean, clean_labels = split.x_test[:n_den], split.y_test[:n_den]
    noised = partially_noised(clean, DENOISE_LEVEL, _noise(cfg.seed + 200_000, n_den, shape))
    true_label = [Condition(labels=(int(y),), cfg_scale=1.0) for y in clean_labels]
    adaptive_denoise = replace(defaults.adaptive(), max_steps=defaults.denoise_steps)
    uncond = _run(loaded, noised, [Condition()] * n_den, adaptive_denoise)
    with_label = _run(loaded, noised, true_label, adaptive_denoise)
    uncond_fixed = _run(loaded, noised, [Condition()] * n_den, replace(defaults.params, max_steps=defaults.denoise_steps))
    report.psnr_noised = _psnr(noised, clean)
    report.psnr_uncond = _psnr(uncond.latents, clean)
    report.psnr_label = _psnr(with_label.latents, clean)
    report.psnr_uncond_fixed = _psnr(uncond_fixed.latents, clean)
    report.denoise_steps = float(np.mean(uncond.steps))
    report.denoise_count = n_den
    log(f"denoising g={DENOISE_LEVEL}: PSNR {report.psnr_noised:.2f} -> {report.psnr_uncond:.2f} dB "
        f"(unconditional, adaptive, {report.denoise_steps:.1f} steps), {report.psnr_label:.2f} dB (true label), "
        f"{report.psnr_uncond_fixed:.2f} dB (unconditional, {defaults.denoise_steps} steps)")

    # OOD: the unconditional gradient norm at the input; in-distribution = held-out test digits.
    n_ood = cfg.ood_count or split.x_test.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed + 300_000)
    test = split.x_test[:n_ood]
    report.ood_count = n_ood
    uniform = torch.rand(test.shape, generator=gen) * 2.0 - 1.0
    perms = torch.stack([torch.randperm(test[0].numel(), generator=gen) for _ in range(n_ood)])
    shuffled = torch.gather(test.flatten(1), 1, perms).reshape(test.shape)
    norm_test, norm_uniform, norm_shuffled = (gradient_norms(loaded, x) for x in (test, uniform, shuffled))
    report.auroc_uniform = _auroc(norm_test, norm_uniform)
    report.auroc_shuffled = _auroc(norm_test, norm_shuffled)
    report.norm_test, report.norm_uniform, report.norm_shuffled = (
        float(v.median()) for v in (norm_test, norm_uniform, norm_shuffled))
    log(f"OOD AUROC: {report.auroc_uniform:.4f} vs uniform noise, {report.auroc_shuffled:.4f} vs shuffled pixels")
    report.seconds = time.perf_counter() - t0
    return report


def _auroc(inlier_scores: torch.Tensor, outlier_scores: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score
    scores = torch.cat([inlier_scores, outlier_scores]).numpy()
    is_outlier = np.r_[np.zeros(len(inlier_scores)), np.ones(len(outlier_scores))]
    return float(roc_auc_score(is_outlier, scores))


def save_grid(latents: torch.Tensor, labels: np.ndarray, path: Path, columns: int) -> None:
    """One row per class, ``columns`` samples each, upscaled nearest-neighbour so the digits are visible."""
    from PIL import Image
    images = IdentityCodec(1, latents.shape[-1]).decode(latents)[..., 0]       # (N, 8, 8) uint8
    classes = sorted(set(labels.tolist()))
    size, gap = images.shape[1] * GRID_SCALE, 2
    grid = np.full((len(classes) * (size + gap) + gap, columns * (size + gap) + gap), 128, dtype=np.uint8)
    for row, c in enumerate(classes):
        for col, img in enumerate(images[labels == c][:columns]):
            big = np.kron(img, np.ones((GRID_SCALE, GRID_SCALE), dtype=np.uint8))
            top, left = gap + row * (size + gap), gap + col * (size + gap)
            grid[top:top + size, left:left + size] = big
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def format_report(report: Report, cfg: EvalConfig, quick: bool) -> str:
    """The markdown section for bench/RESULTS.md (also what gets printed)."""
    d = cfg.defaults
    p = d.params
    date = dt.date.today().isoformat()
    lines = [
        SECTION_TITLE,
        "",
        f"Measured {date} by `python bench/eval_digits.py{' --quick' if quick else ''}` on CPU "
        f"({os.cpu_count()} cores, torch threads: {torch.get_num_threads()}), torch {torch.__version__}, "
        f"in {report.seconds:.0f} s. Checkpoint `{cfg.checkpoint}`; every figure is on the held-out test split "
        "(stratified 20 %, seed 0) or on samples judged by a classifier trained on the train split only.",
        "",
        f"Default sampler: {p.sampler.upper()}-GD, step size {p.step_size}, mu {p.mu}, {p.max_steps} steps, "
        f"CFG {d.cfg_scale}; adaptive stopping at ‖g‖ < {d.grad_norm_threshold}; noise seeds from {cfg.seed}.",
        "",
        "| Measure | Result | Target |",
        "|---|---|---|",
        f"| Classifier ({report.classifier_name}) test accuracy | {report.classifier_accuracy:.1%} | >= 97 % |",
        f"| Class-conditional accuracy ({report.samples} samples, {cfg.per_class}/class, "
        f"{report.fixed_steps:.0f} steps) | {report.fixed_accuracy:.1%} | >= 90 % |",
        f"| Adaptive stopping (‖g‖ < {d.grad_norm_threshold}): mean steps, accuracy | "
        f"{report.adaptive_steps:.1f} steps ({report.step_saving:.0%} saved), {report.adaptive_accuracy:.1%} "
        f"({(report.adaptive_accuracy - report.fixed_accuracy) * 100:+.1f} pts) | >= -2 pts (the saving at equal FD: "
        "NFE-quality frontier section) |",
        f"| Composition (2 labels, {cfg.per_pair}/pair, CFG {d.composition_cfg_scale}): in one of the two | "
        f"{report.composition_mean:.1%} | >= 80 % |",
        f"| Denoising g = {DENOISE_LEVEL} ({report.denoise_count} test digits): PSNR noised -> unconditional adaptive descent "
        f"({report.denoise_steps:.1f} steps) | {report.psnr_noised:.2f} -> {report.psnr_uncond:.2f} dB "
        f"({report.psnr_uncond - report.psnr_noised:+.2f} dB) | >= +3 dB |",
        f"| Denoising, same start: descent with the true label (CFG 1, adaptive) | "
        f"{report.psnr_label:.2f} dB ({report.psnr_label - report.psnr_noised:+.2f} dB) | |",
        f"| Denoising, same start: unconditional, fixed {d.denoise_steps} steps | "
        f"{report.psnr_uncond_fixed:.2f} dB ({report.psnr_uncond_fixed - report.psnr_noised:+.2f} dB) | |",
        f"| OOD AUROC of ‖f(x, null)‖ ({report.ood_count} each): test digits vs uniform noise in [-1, 1] | {report.auroc_uniform:.4f} | >= 0.9 |",
        f"| OOD AUROC of ‖f(x, null)‖: test digits vs pixel-shuffled test digits | {report.auroc_shuffled:.4f} | >= 0.9 |",
        "",
        "Per-class accuracy: " + ", ".join(f"{c}: {a:.0%}" for c, a in enumerate(report.per_class_accuracy)) + ".",
        "Composition pairs (in either / first / second): " + "; ".join(
            f"{a}+{b}: {v[0]:.0%} / {v[1]:.0%} / {v[2]:.0%}" for (a, b), v in report.composition.items()) + ".",
        f"Median ‖f(x, null)‖: test digits {report.norm_test:.2f}, uniform noise {report.norm_uniform:.2f}, "
        f"shuffled digits {report.norm_shuffled:.2f}. Denoising starts from "
        f"g*x + (1-g)*eps with g = {DENOISE_LEVEL}; PSNR is per image on [-1, 1] (peak-to-peak 2), both images "
        "clamped, then averaged.",
    ]
    if cfg.grid_path is not None:
        lines.append(f"Samples per class (one row per digit, {GRID_SCALE}x nearest): "
                     f"`{cfg.grid_path.relative_to(ROOT) if cfg.grid_path.is_relative_to(ROOT) else cfg.grid_path}`.")
    lines.append("")
    return "\n".join(lines)


def write_section(section: str, path: Path = RESULTS_PATH) -> None:
    """Replace this report's section of RESULTS.md (or append it), leaving every other section as it is."""
    results.write_section(SECTION_TITLE, section, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from service.cli.eval_digits import add_arguments as eqm_eval_digits_arguments    # one definition, torch-free
    eqm_eval_digits_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    from models import resolve_checkpoint as resolve
    from service.cli.threads import apply_threads
    # The report runs on the CPU: one thread for the small digits models unless --threads says otherwise.
    threads = apply_threads(args.threads, "cpu", resolve(args.checkpoint))
    cfg = EvalConfig(checkpoint=args.checkpoint, seed=args.seed, threads=threads)
    if args.quick:
        cfg = cfg.quick()
    if args.no_write:
        cfg = replace(cfg, grid_path=None)
    if args.per_class is not None:
        cfg = replace(cfg, per_class=args.per_class, per_pair=args.per_class)
    report = evaluate(cfg, log=lambda msg: print(msg, file=sys.stderr))
    section = format_report(report, cfg, args.quick)
    print(section)
    # A quick run is a smoke test: its figures are too noisy to replace the measured section.
    if not args.no_write and not args.quick:
        write_section(section)
        print(f"wrote {RESULTS_PATH.relative_to(ROOT)} and {GRID_PATH.relative_to(ROOT)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval_digits", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
