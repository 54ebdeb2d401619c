"""``eqm sample`` for models whose sampler is the Euler-Heun SDE (Energy Matching): its flags, energies of the results."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

GD_FLAGS = {"labels": "--labels", "sampler": "--sampler", "step_size": "--step-size", "mu": "--mu",
            "cfg_scale": "--cfg-scale", "guidance_channels": "--guidance-channels", "start": "--start",
            "noise_level": "--noise-level"}


def heun_settings(args: argparse.Namespace, model_defaults: dict):
    """Flags given > the checkpoint's recommended settings > the official CIFAR-10 setting (t_end 3.25)."""
    from dataclasses import asdict

    from models.heun_sde import HeunSDEParams
    from service.cli import UsageError
    official = HeunSDEParams()
    merged = {k: v for k, v in asdict(official).items() if k != "max_steps"}
    recorded = {("dt" if k == "step_size" else k): v for k, v in model_defaults.items()}
    merged.update({k: v for k, v in recorded.items() if k in merged or k == "max_steps"})
    for key, value in (("dt", args.dt), ("epsilon_max", args.epsilon_max), ("time_cutoff", args.time_cutoff),
                       ("grad_norm_threshold", args.grad_norm_threshold)):
        if value is not None:
            merged[key] = value
    if args.steps is not None and args.t_end is not None:
        raise UsageError("give --steps or --t-end, not both (steps = t_end / dt)")
    try:
        if args.steps is not None:
            merged["max_steps"] = args.steps
        elif args.t_end is not None or "max_steps" not in merged:
            return HeunSDEParams.for_t_end(official.t_end if args.t_end is None else args.t_end, **merged)
        return HeunSDEParams(**merged)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_energy_sample(args: argparse.Namespace, loaded) -> int:
    """Sampling goes through the engine's slot batch (``models.sampler.sample``) with the heun-sde sampler."""
    import numpy as np
    import torch

    from models.codecs import make_codec
    from models.heun_sde import NFE_PER_STEP
    from models.sampler import Condition, SamplerParams, noise_for_seed, sample
    from service.cli import UsageError
    from service.cli.common import inpaint_inputs, load_npy, save_npy

    given = [flag for name, flag in GD_FLAGS.items() if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: not used by Energy Matching models (unconditional, sampled by the "
                         "Euler-Heun SDE: --dt, --steps or --t-end, --epsilon-max, --time-cutoff)")
    if getattr(args, "ebm", None) not in (None, "none"):
        raise UsageError("--ebm: an Energy Matching model has its own energy, the potential V(x)")
    if bool(args.inpaint) != bool(args.mask):
        raise UsageError("--inpaint IMAGE and --mask MASK go together")
    cfg = loaded.spec.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    noise = load_npy(args.noise, "--noise") if args.noise else None
    n = noise.shape[0] if noise is not None else args.n
    if not n:
        raise UsageError("give --n or --noise to say how many images to make")
    if noise is not None and tuple(noise.shape[1:]) != shape:
        raise UsageError(f"--noise has shape {noise.shape}, expected ({n}, {', '.join(map(str, shape))})")
    if not (args.out or args.images_out or args.latents_out or args.energies_out):
        raise UsageError("nothing to write: give --out DIR, --images-out, --latents-out or --energies-out FILE.npy")
    heun = heun_settings(args, loaded.spec.sampler_defaults)
    params = SamplerParams(sampler="heun-sde", step_size=heun.dt, max_steps=heun.max_steps,
                           epsilon_max=heun.epsilon_max, time_cutoff=heun.time_cutoff,
                           grad_norm_threshold=heun.grad_norm_threshold)
    seeds = [args.seed + i for i in range(n)]
    x0 = torch.from_numpy(noise) if noise is not None else torch.stack([noise_for_seed(s, shape) for s in seeds])
    codec = make_codec("identity", channels=cfg.in_channels, latent_size=cfg.input_size)
    holds, inpaint = None, None
    if args.inpaint:
        inpaint = inpaint_inputs(args, codec, cfg.input_size)
        holds = [inpaint[2]] * n
    stats: dict = {}
    t0 = time.perf_counter()
    result = sample(loaded.field, x0, [Condition()] * n, params, null_label=0,
                    guided_channels=cfg.in_channels, progress=_heun_progress(params.max_steps), stats=stats,
                    seeds=seeds, holds=holds)
    elapsed = time.perf_counter() - t0
    print(f"sampled {n} in {elapsed:.1f}s; Heun steps per sample: mean {np.mean(result.steps):.1f} "
          f"(t_end {heun.t_end:g}, {NFE_PER_STEP} evaluations each), evaluations {stats['nfe']}; "
          f"V mean {np.mean(result.energies):.4g}", file=sys.stderr)
    if args.latents_out:
        latents = result.latents.numpy().astype(np.float32)
        save_npy(args.latents_out, latents)
        print(f"wrote {args.latents_out}: latents, float32 {tuple(latents.shape)}", file=sys.stderr)
    if args.energies_out:
        energies = np.asarray(result.energies, dtype=np.float32)
        save_npy(args.energies_out, energies)
        print(f"wrote {args.energies_out}: energies V(x), float32 {tuple(energies.shape)}", file=sys.stderr)
    if args.out or args.images_out:
        images = codec.decode(result.latents)
        if inpaint is not None:
            from models.inpaint import composite
            images = np.stack([composite(img, inpaint[0], inpaint[1]) for img in images])
        if args.images_out:
            save_npy(args.images_out, images)
            print(f"wrote {args.images_out}: images, uint8 {tuple(images.shape)}", file=sys.stderr)
        if args.out:
            from PIL import Image
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{i:06d}.png")
            print(f"wrote {len(images)} PNG file{'s' if len(images) != 1 else ''} to {out}/", file=sys.stderr)
    return 0


def _heun_progress(heun_steps: int):
    """The progress line in Heun steps (the unit of --steps and of the summary), not field evaluations."""
    from models.heun_sde import NFE_PER_STEP
    from service.cli.common import progress_bar
    report = progress_bar(heun_steps)
    return lambda evaluations, _total: report(evaluations // NFE_PER_STEP, heun_steps)
