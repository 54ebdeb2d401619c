"""``eqm convert``: an official checkpoint (.pt) -> safetensors with metadata."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="official checkpoint -> safetensors with metadata",
                       description="Write the chosen weights of an official checkpoint as safetensors, with the "
                                   "architecture, input size, classes and guidance mode as metadata.")
    c.add_argument("src", help="official train.py checkpoint (.pt) or bare state dict")
    c.add_argument("dst", help="output .safetensors file")
    c.add_argument("--arch", help="architecture, checked against the file")
    c.add_argument("--weights", choices=["ema", "model"], default="ema")
    c.add_argument("--guidance-channels", choices=["official", "all"], default="official",
                   help="guidance mode to record (official = first 3 channels, as the released weights were evaluated)")
    c.add_argument("--model-flag", action="append", default=[], metavar="NAME=VALUE",
                   help="Energy Matching checkpoints: a training flag the file does not record (official names, "
                        "e.g. num_heads=4, output_scale=1000); the official defaults otherwise")
    c.add_argument("--ebm", choices=["none", "dot", "l2", "mean"],
                   help="energy form of a bare state dict (an official checkpoint records its own --ebm)")
    c.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from service.cli.energy_sample import is_energy_checkpoint
    if is_energy_checkpoint(args.src):
        return run_convert_energy(args)
    from models.checkpoint import convert, describe
    loaded = convert(args.src, args.dst, arch=args.arch, weights=args.weights, guidance_mode=args.guidance_channels,
                     ebm=args.ebm)
    print(f"wrote {args.dst}: {describe(loaded.spec.config)}, {args.weights} weights, "
          f"guidance on {loaded.spec.guided_channels} channels, energy form {loaded.spec.energy_form}")
    return 0


def run_convert_energy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.checkpoint import CheckpointError
    from models.em_checkpoint import load_energy_matching, save_energy_matching
    from service.cli.common import parse_model_flags
    dst = Path(args.dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output name must end in .safetensors")
    if not dst.parent.exists():
        raise CheckpointError(f"{dst.parent}: output folder does not exist")
    if args.arch:
        raise CheckpointError("--arch names EqM sizes; an Energy Matching checkpoint takes --model-flag NAME=VALUE")
    loaded = load_energy_matching(args.src, weights=args.weights, overrides=parse_model_flags(args.model_flag))
    save_energy_matching(loaded.network, dst, extra={"source_weights": args.weights},
                         sampler_defaults=loaded.sampler_defaults)
    c = loaded.config
    print(f"wrote {args.dst}: Energy Matching {c.arch} ({c.in_channels}x{c.input_size}x{c.input_size}, "
          f"UNet {c.num_channels} channels, ViT {c.transformer_nlayers}x{c.embed_dim}), {args.weights} weights")
    return 0
