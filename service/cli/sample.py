"""``eqm sample``: offline sampling, reproducible from a saved noise file (torch is imported by the handler)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from service.cli.common import DTYPES, inpaint_inputs, load_npy, parse_model_flags, progress_bar, save_npy
from service.cli.threads import add_threads_argument, apply_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate images offline (reproducible from a saved noise file)",
                       description="Generate images by gradient descent on the EqM field. Sampler options left out "
                                   "take the checkpoint's recommended settings if it records any (the bundled digits "
                                   f"model does: {_describe(bundled_defaults())}), else the paper's EqM-XL/2 setting: "
                                   f"{_describe(PAPER_DEFAULTS)}. Each option's help names both.")
    p.add_argument("--checkpoint", help="checkpoint file (.pt official, bare state dict, "
                   ".safetensors) or a bundled model name (" + ", ".join(bundled_names()) + "); with --from-png: default the "
                   "PNG's model")
    p.add_argument("--from-png", help="rerun the generation recorded in a PNG made by the service (its "
                   "eqm-parameters text chunk: labels, seed, sampler settings); writes the image to --out")
    p.add_argument("--arch", help="architecture, e.g. EqM-XL/2 (checked against the file; needed by none)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a training checkpoint")
    p.add_argument("--labels", help="comma-separated class labels, one image each (e.g. 1,207,999); "
                   "'a+b' composes labels a and b")
    p.add_argument("--n", type=int, help="number of images when --labels is not given (unconditional)")
    p.add_argument("--noise", help="initial latents, .npy float32 of shape (n, C, H, W)")
    p.add_argument("--start", help="start latents to denoise, .npy float32 (n, C, H, W) (noised with --noise-level)")
    p.add_argument("--noise-level", type=float, default=None,
                   help="with --start: g in x = g*start + (1-g)*eps (1 = no extra noise)")
    p.add_argument("--seed", type=int, default=0, help="seed of image i is seed + i (ignored with --noise)")
    d = _default_help
    p.add_argument("--sampler", choices=["nag", "gd"], default=None, help=f"default: {d('sampler')}")
    p.add_argument("--steps", type=int, default=None, help="number of gradient updates (official "
                   f"--num-sampling-steps minus 1); default: {d('max_steps')}")
    p.add_argument("--step-size", type=float, default=None, help=f"default: {d('step_size')}")
    p.add_argument("--mu", type=float, default=None, help=f"NAG-GD look-ahead factor; default: {d('mu')}")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = none); "
                   f"default: {d('cfg_scale')}")
    p.add_argument("--guidance-channels", choices=["official", "all"], default=None,
                   help="guide the first 3 latent channels (official EqM) or all; default: from the checkpoint")
    p.add_argument("--grad-norm-threshold", type=float, default=None, help="stop a sample when ||grad|| < this "
                   f"(0 = off); default: {d('grad_norm_threshold')}")
    p.add_argument("--latents-out", help="write final latents, .npy float32 (n, C, H, W)")
    p.add_argument("--images-out", help="write images, .npy uint8 (n, H, W, C)")
    p.add_argument("--out", help="folder for PNG files")
    p.add_argument("--vae", default=os.environ.get("EQM_VAE"), help="SD-VAE folder (diffusers) for latent models")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (state stays float32)")
    add_threads_argument(p)
    add_energy_arguments(p)
    add_run_arguments(p)
    em = p.add_argument_group("Energy Matching models (Euler-Heun SDE; --steps counts Heun steps, 2 evaluations each)")
    em.add_argument("--dt", type=float, default=None, help="SDE time step; default 0.01")
    em.add_argument("--t-end", type=float, default=None,
                    help="final SDE time (official --t_end; steps = t_end / dt); default 3.25, or --steps")
    em.add_argument("--epsilon-max", type=float, default=None,
                    help="temperature reached at t = 1 (0 = deterministic Heun flow); default 0.01")
    em.add_argument("--time-cutoff", type=float, default=None, help="temperature is 0 before this time; default 1.0")
    em.add_argument("--model-flag", action="append", default=[], metavar="NAME=VALUE",
                    help="architecture flag of an official checkpoint (official names, e.g. num_heads=4, "
                         "channel_mult=1,2,2,2, output_scale=1000); repeat for several")
    p.set_defaults(handler=run_sample)


def add_energy_arguments(p: argparse.ArgumentParser) -> None:
    """Energy forms, energies, composition mode and inpainting options of ``eqm sample``."""
    p.add_argument("--ebm", choices=["none", "dot", "l2", "mean"], default=None,
                   help="energy form of a checkpoint that records none (official train.py --ebm; default: "
                        "what the file records, else none = implicit EqM)")
    p.add_argument("--energies-out", help="write each image's final energy (lower on data), .npy float32 (n,), "
                   "in label order; EqM-E and Energy Matching models (V(x)) only")
    p.add_argument("--compose-mode", choices=["guided", "sum"], default="guided",
                   help="'a+b' labels: guided (u + s*sum w_k (c_k - u), weights 1/K) or sum (the paper's "
                        "sum_k c_k, no null row)")
    p.add_argument("--inpaint", help="image to complete (PNG of the model's size); needs --mask")
    p.add_argument("--mask", help="with --inpaint: PNG mask, white = regenerate, black = keep")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Many samples in the ADM evaluator's format, offline or as a sampling run of a server."""
    g = p.add_argument_group("evaluation sets (ADM .npz: arr_0 uint8 N x H x W x 3, arr_1 labels)")
    g.add_argument("--num-samples", type=int, help="number of images, labels uniform (num_samples / num_classes "
                   "per class, in order) unless --labels lists them")
    g.add_argument("--npz", help="write the images as the ADM evaluator's .npz (grey images repeated to 3 channels)")
    g.add_argument("--server", help="sample on a running service (URL) as a sampling run: progress, then the .npz "
                   "is downloaded (needs --num-samples and --npz)")
    g.add_argument("--stats-out", help="with --server: also download per-image steps, gradient norms, energies (.npz)")
    g.add_argument("--api-key", default=os.environ.get("EQM_API_KEY"), help="with --server: API key (default "
                   "EQM_API_KEY)")


def run_on_server(args: argparse.Namespace) -> int:
    from service.cli import UsageError
    from service.sampling_client import RunError, sample_remote
    if not args.num_samples or not args.npz:
        raise UsageError("--server needs --num-samples N and --npz FILE")
    labels = "uniform"
    if args.labels:
        labels = [int(ys[0]) for ys in parse_labels(args.labels)]
    settings = {"sampler": args.sampler, "max_steps": args.steps, "step_size": args.step_size, "mu": args.mu,
                "guidance_scale": args.cfg_scale, "grad_norm_threshold": args.grad_norm_threshold}
    try:
        sample_remote(args.server, args.num_samples, args.npz, labels=labels, seed=args.seed,
                      stats_out=args.stats_out, api_key=args.api_key,
                      settings={k: v for k, v in settings.items() if v is not None})
    except RunError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--server {args.server}: {exc}") from None
    return 0


def write_adm_npz(path: str, images, labels) -> None:
    """The ADM evaluator's layout, written to a temporary name then renamed."""
    import numpy as np

    from service.runs.store import adm_rgb
    tmp = Path(path + ".tmp.npz")
    np.savez(tmp, arr_0=adm_rgb(images).astype(np.uint8), arr_1=np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)


def parse_labels(text: str) -> list[tuple[int, ...]]:
    """'1,207,3+5' -> [(1,), (207,), (3, 5)]."""
    from service.cli import UsageError
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            out.append(tuple(int(p) for p in item.split("+")))
        except ValueError:
            raise UsageError(f"--labels: {item!r} is not a label (integers, comma-separated, '+' to compose)") from None
    return out


def run_sample(args: argparse.Namespace) -> int:
    from service.cli import UsageError
    if args.from_png:
        return run_from_png(args)
    if args.server:
        return run_on_server(args)
    if not args.checkpoint:
        raise UsageError("--checkpoint is required (or --from-png FILE)")
    check_checkpoint_exists(args.checkpoint)            # at once: before torch and the model load
    from models import resolve_checkpoint
    apply_threads(args.threads, args.device, resolve_checkpoint(args.checkpoint))
    from models import load_model
    from models.codecs import make_codec
    from models.sampler import Condition, noise_for_seed, partially_noised, sample
    import numpy as np
    import torch

    from service.cli import UsageError
    from service.cli.energy_sample import run_energy_sample

    dtype = getattr(torch, DTYPES[args.dtype])
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.checkpoint, arch=args.arch, weights=args.weights,
                        guidance_mode=args.guidance_channels, device=args.device, dtype=dtype,
                        ebm=getattr(args, "ebm", None), overrides=parse_model_flags(args.model_flag))
    if loaded.spec.sampler_defaults.get("sampler") == "heun-sde":
        return run_energy_sample(args, loaded)     # the SDE's own flags (--dt, --t-end, ...)
    cfg, spec = loaded.model.config, loaded.spec
    if args.energies_out and not loaded.field.has_energy:
        raise UsageError("--energies-out: this model has no energy (implicit EqM); an EqM-E checkpoint "
                         "(--ebm dot|l2|mean) has one")
    if bool(args.inpaint) != bool(args.mask):
        raise UsageError("--inpaint IMAGE and --mask MASK go together")
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    label_sets = parse_labels(args.labels) if args.labels else None
    if args.num_samples and not label_sets:
        from service.runs.plan import uniform_labels
        label_sets = [(y,) if y >= 0 else () for y in uniform_labels(args.num_samples, cfg.num_classes)]
    noise = load_npy(args.noise, "--noise") if args.noise else None
    start = load_npy(args.start, "--start") if args.start else None
    n = len(label_sets) if label_sets else (noise.shape[0] if noise is not None else
                                            start.shape[0] if start is not None else args.n)
    if not n:
        raise UsageError("give --labels, --n, --noise or --start to say how many images to make")
    label_sets = label_sets or [()] * n
    for arr, what in ((noise, "--noise"), (start, "--start")):
        if arr is not None and (arr.shape[0] != n or tuple(arr.shape[1:]) != shape):
            raise UsageError(f"{what} has shape {arr.shape}, expected ({n}, {', '.join(map(str, shape))})")
    for labels in label_sets:
        for y in labels:
            if not 0 <= y < cfg.num_classes:
                raise UsageError(f"--labels: {y} is out of range (the model has classes 0..{cfg.num_classes - 1})")
    if not (args.out or args.images_out or args.latents_out or args.npz):
        raise UsageError("nothing to write: give --out DIR, --images-out FILE.npy, --npz FILE or --latents-out FILE.npy")
    codec = None
    if args.out or args.images_out or args.npz or args.inpaint:
        codec = make_codec(spec.codec, channels=cfg.in_channels, latent_size=cfg.input_size, vae_dir=args.vae,
                           device=args.device)

    eps = torch.from_numpy(noise) if noise is not None else torch.stack([noise_for_seed(args.seed + i, shape) for i in range(n)])
    x0 = eps if start is None else (torch.from_numpy(start) if args.noise_level is None
                                    else partially_noised(torch.from_numpy(start), args.noise_level, eps))
    params, cfg_scale = sampler_settings(args, spec.sampler_defaults)
    conditions = [Condition(labels=labels, cfg_scale=cfg_scale if labels else 1.0, mode=args.compose_mode)
                  for labels in label_sets]
    holds, inpaint = None, None
    if args.inpaint:
        inpaint = inpaint_inputs(args, codec, cfg.input_size * getattr(codec, "downsample", 1))
        holds = [inpaint[2]] * n
    t0 = time.perf_counter()
    result = sample(loaded.field, x0, conditions, params, null_label=cfg.null_label,
                    guided_channels=spec.guided_channels, progress=progress_bar(params.max_steps), holds=holds)
    elapsed = time.perf_counter() - t0
    print(f"sampled {n} in {elapsed:.1f}s; steps per sample: mean {np.mean(result.steps):.1f}, "
          f"min {min(result.steps)}, max {max(result.steps)}", file=sys.stderr)

    if args.latents_out:
        latents = result.latents.numpy().astype(np.float32)
        save_npy(args.latents_out, latents)
        print(f"wrote {args.latents_out}: latents, float32 {tuple(latents.shape)}", file=sys.stderr)
    if args.energies_out:
        energies = np.asarray(result.energies, dtype=np.float32)
        save_npy(args.energies_out, energies)
        print(f"wrote {args.energies_out}: energies, float32 {tuple(energies.shape)}", file=sys.stderr)
    if codec is not None and (args.out or args.images_out or args.npz):
        images = codec.decode(result.latents)
        if inpaint is not None:
            from models.inpaint import composite
            images = np.stack([composite(img, inpaint[0], inpaint[1]) for img in images])
        if args.images_out:
            save_npy(args.images_out, images)
            print(f"wrote {args.images_out}: images, uint8 {tuple(images.shape)}", file=sys.stderr)
        if args.npz:
            write_adm_npz(args.npz, images, [ys[0] if ys else -1 for ys in label_sets])
            print(f"wrote {args.npz}: ADM arrays, arr_0 uint8 ({len(images)}, {images.shape[1]}, {images.shape[2]}, 3)",
                  file=sys.stderr)
        if args.out:
            from PIL import Image
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            names = [out / f"{i:06d}.png" for i in range(len(images))]
            for name, img in zip(names, images):
                tmp = name.with_name(name.name + ".tmp")
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
                os.replace(tmp, name)
            print(f"wrote {len(names)} PNG file{'s' if len(names) != 1 else ''} to {out}/: {names[0].name}"
                  + (f" .. {names[-1].name}" if len(names) > 1 else ""), file=sys.stderr)
    return 0


def run_from_png(args: argparse.Namespace) -> int:
    """``--from-png FILE``: sample again with the seed, labels and settings the PNG records; compare."""
    from models import resolve_checkpoint
    from models import load_model
    from models.codecs import make_codec
    from models.sampler import Condition, SamplerParams, noise_for_seed, sample
    from service.cli import UsageError
    from service.images import ImageError, encode_image, provenance_record, read_provenance
    from service.jobstore import ImageSpec, JobSpec, SamplerSpec
    try:
        data = Path(args.from_png).read_bytes()
        rec = read_provenance(data)
    except (OSError, ImageError) as exc:
        raise UsageError(f"--from-png {args.from_png}: {exc}") from None
    if rec is None:
        raise UsageError(f"--from-png {args.from_png}: the PNG records no generation parameters (eqm-parameters)")
    if rec["kind"] == "denoise":
        raise UsageError(f"--from-png {args.from_png}: a denoised image depends on its input image, which the PNG "
                         "does not hold; rerun it with --start and --noise-level")
    if not args.out:
        raise UsageError("--from-png needs --out DIR for the reproduced image")
    check_checkpoint_exists(args.checkpoint or rec["model"])
    apply_threads(args.threads, args.device, resolve_checkpoint(args.checkpoint or rec["model"]))
    import torch
    loaded = load_model(resolve_checkpoint(args.checkpoint or rec["model"]), device=args.device,
                        dtype=getattr(torch, DTYPES[args.dtype]))
    cfg, spec = loaded.model.config, loaded.spec
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    labels = tuple(int(y) for y in rec["labels"])
    weights = tuple(rec["weights"]) if rec.get("weights") else None
    sampler = SamplerSpec(rec["sampler"], rec["step_size"], rec["mu"], rec["max_steps"], rec["grad_norm_threshold"])
    params = SamplerParams(sampler.sampler, sampler.step_size, sampler.mu, sampler.max_steps, sampler.grad_norm_threshold)
    condition = Condition(labels, weights, rec["guidance_scale"] if labels else 1.0)
    result = sample(loaded.model, noise_for_seed(int(rec["seed"]), shape)[None], [condition], params,
                    null_label=cfg.null_label, guided_channels=spec.guided_channels)
    codec = make_codec(spec.codec, channels=cfg.in_channels, latent_size=cfg.input_size, vae_dir=args.vae,
                       device=args.device)
    pixels = codec.decode(result.latents)[0]
    job = JobSpec(kind=rec["kind"], model=rec["model"], images=[ImageSpec(int(rec["seed"]), list(labels),
                  list(weights) if weights else None)], cfg_scale=rec["guidance_scale"], sampler=sampler)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / Path(args.from_png).name
    target.write_bytes(encode_image(pixels, "png", provenance=provenance_record(job, 0, result.steps[0],
                                                                                 result.grad_norms[0])))
    import io

    import numpy as np
    from PIL import Image
    original = np.array(Image.open(io.BytesIO(data)).convert("L" if pixels.shape[-1] == 1 else "RGB"), dtype=np.int16)
    diff = int(np.abs(original.reshape(pixels.shape) - pixels.astype(np.int16)).max())
    print(f"wrote {target}: {result.steps[0]} steps (recorded {rec['steps']}), final grad norm "
          f"{result.grad_norms[0]:.4g} (recorded {rec['grad_norm']}), largest pixel difference {diff}")
    return 0


PAPER_DEFAULTS = {"sampler": "nag", "step_size": 0.0017, "mu": 0.3, "max_steps": 249, "grad_norm_threshold": 0.0,
                  "cfg_scale": 1.5}


def sampler_settings(args: argparse.Namespace, model_defaults: dict):
    """Flags given > the checkpoint's recommended settings > the paper's EqM-XL/2 setting."""
    from models.sampler import SamplerParams
    merged = {**PAPER_DEFAULTS, **{k: v for k, v in model_defaults.items() if k in PAPER_DEFAULTS}}
    given = {"sampler": args.sampler, "step_size": args.step_size, "mu": args.mu, "max_steps": args.steps,
             "grad_norm_threshold": args.grad_norm_threshold, "cfg_scale": args.cfg_scale}
    merged.update({k: v for k, v in given.items() if v is not None})
    cfg_scale = float(merged.pop("cfg_scale"))
    return SamplerParams(**merged), cfg_scale


def check_checkpoint_exists(name_or_path: str) -> None:
    """A checkpoint that is neither a bundled model nor a file: one line, before anything heavy loads."""
    from models import BUNDLED, resolve_checkpoint
    from service.cli import UsageError
    path = resolve_checkpoint(name_or_path)
    if not path.is_file():
        what = "a folder, not a checkpoint file" if path.is_dir() else "no such file"
        raise UsageError(f"--checkpoint {name_or_path}: {what} (a checkpoint file: .pt or .safetensors, or a bundled "
                         f"model: {', '.join(sorted(BUNDLED))})")


def bundled_names() -> list[str]:
    """The names ``--checkpoint`` takes for the models that ship in the package."""
    from models import BUNDLED
    return list(BUNDLED)


def bundled_defaults(name: str = "digits") -> dict:
    """The sampler settings a bundled model's file recommends, read from its safetensors header (no torch)."""
    import json
    import struct

    from models import BUNDLED
    try:
        with open(BUNDLED[name], "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        return json.loads(header["__metadata__"]["sampler_defaults"])
    except (OSError, KeyError, ValueError, struct.error):
        return {}


def _describe(defaults: dict) -> str:
    if not defaults:
        return "none recorded"
    d = {**PAPER_DEFAULTS, **defaults}
    stop = f"stop below gradient norm {d['grad_norm_threshold']}" if d["grad_norm_threshold"] else "no early stop"
    return (f"{d['sampler'].upper()}-GD, step size {d['step_size']}, mu {d['mu']}, {d['max_steps']} updates, "
            f"CFG {d['cfg_scale']}, {stop}")


def _default_help(key: str) -> str:
    bundled = bundled_defaults()
    if key in bundled and bundled[key] != PAPER_DEFAULTS[key]:
        return f"the checkpoint's recommendation (digits {bundled[key]}), else {PAPER_DEFAULTS[key]}"
    return f"the checkpoint's recommendation, else {PAPER_DEFAULTS[key]}"
