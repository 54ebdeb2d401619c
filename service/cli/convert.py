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
    from models.registry import convert_model
    from service.cli.common import parse_model_flags
    summary = convert_model(args.src, args.dst, arch=args.arch, weights=args.weights,
                            guidance_mode=args.guidance_channels, ebm=args.ebm,
                            overrides=parse_model_flags(args.model_flag))
    print(f"wrote {args.dst}: {summary}")
    return 0
