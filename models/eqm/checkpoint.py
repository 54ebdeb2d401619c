"""EqM checkpoints: official ``train.py`` checkpoints, bare state dicts and safetensors files.

Nothing is unpickled beyond tensors and the ``argparse.Namespace`` the official trainer stores
(``torch.load(weights_only=True)``). Every failure is a ``CheckpointError`` with a one-line message
that says what was wrong; the CLI prints it without a traceback.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path

import torch

from models.family import LoadedModel, ModelSpec
from models.files import CheckpointError, load_strict, read_checkpoint_file, write_safetensors  # noqa: F401

from .field import ENERGY_FORMS, field_for
from .network import ARCHITECTURES, EqM, EqMConfig, arch_name, config_for

METADATA_FORMAT = "eqm-safetensors/1"
GUIDANCE_MODES = ("all", "official")   # CFG on all latent channels, or the official first-3-channels quirk


def read_state_dict(path: str | os.PathLike, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata (safetensors only; empty otherwise) of a checkpoint file.

    ``weights`` picks ``"ema"`` (the default, what sampling uses) or ``"model"`` in an official
    training checkpoint; a bare state dict or a safetensors file has one set of weights.
    """
    path = Path(path)
    if weights not in ("ema", "model"):
        raise CheckpointError(f"--weights must be 'ema' or 'model', not {weights!r}")
    obj, metadata = read_checkpoint_file(path)
    if path.suffix == ".safetensors":
        return obj, metadata
    ebm = getattr(obj.get("args"), "ebm", None)
    if ebm is not None:                 # official train.py records --ebm in its args
        metadata["ebm"] = str(ebm)
    if "ema" in obj or "model" in obj:
        if weights not in obj:
            raise CheckpointError(f"{path}: has no {weights!r} weights (it holds {', '.join(sorted(k for k in obj if isinstance(k, str)))})")
        obj = obj[weights]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: its {weights!r} entry is not a state dict")
    tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint (no tensors found)")
    return tensors, metadata


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> EqMConfig:
    """Read the architecture off the tensor shapes (head count from the registry: it has no tensor)."""
    need = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not an EqM checkpoint (missing {', '.join(missing)})")
    hidden, in_ch, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = int(round(state["pos_embed"].shape[1] ** 0.5))
    out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    table = state["y_embedder.embedding_table.weight"].shape[0]
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * hidden
    name = arch_name(depth, hidden, patch)
    heads = ARCHITECTURES[name][3] if name else _guess_heads(hidden)
    # The official models always add the null row (class dropout > 0), so table = classes + 1.
    return EqMConfig(arch=name or "custom", input_size=grid * patch, patch_size=patch, in_channels=in_ch,
                     hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=mlp_hidden / hidden,
                     num_classes=table - 1, learn_sigma=out_ch == 2 * in_ch)


def _guess_heads(hidden: int) -> int:
    for head_dim in (64, 32, 16):
        if hidden % head_dim == 0:
            return hidden // head_dim
    return 1


def _config_from_metadata(meta: dict[str, str]) -> EqMConfig | None:
    if "config" not in meta:
        return None
    raw = json.loads(meta["config"])
    known = {f.name for f in fields(EqMConfig)}
    return EqMConfig(**{k: v for k, v in raw.items() if k in known})


def describe(config: EqMConfig) -> str:
    """Short human name: the registry name plus any non-default input size, channels or classes."""
    extras = []
    if config.input_size != 32:
        extras.append(f"input {config.input_size}")
    if config.in_channels != 4:
        extras.append(f"{config.in_channels} channels")
    if config.num_classes != 1000:
        extras.append(f"{config.num_classes} classes")
    name = config.arch if config.arch != "custom" else f"custom {config.depth}x{config.hidden_size}/{config.patch_size}"
    return name + (f" ({', '.join(extras)})" if extras else "")


def load_model(path: str | os.PathLike, arch: str | None = None, weights: str = "ema", *,
               input_size: int | None = None, num_classes: int | None = None,
               guidance_mode: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, ebm: str | None = None) -> LoadedModel:
    """Build the network a checkpoint describes and load its weights with ``strict=True``.

    ``arch`` (e.g. ``"EqM-XL/2"``) is checked against the file: a checkpoint of another size is a
    one-line error naming what the file really is. Safetensors files written by ``eqm convert``
    carry their own config, guidance mode and codec.

    The energy form (``none`` = implicit EqM, ``dot``/``l2``/``mean`` = EqM-E) comes from the official
    checkpoint's ``args.ebm``, the safetensors metadata ``ebm``, or ``ebm`` for a file that records none;
    an ``ebm`` that contradicts the file is an error.
    """
    if guidance_mode is not None and guidance_mode not in GUIDANCE_MODES:
        raise CheckpointError(f"guidance mode must be one of {', '.join(GUIDANCE_MODES)}, not {guidance_mode!r}")
    if ebm is not None and ebm not in ENERGY_FORMS:
        raise CheckpointError(f"unknown energy form --ebm {ebm!r}; choose one of {', '.join(ENERGY_FORMS)}")
    state, meta = read_state_dict(path, weights)
    recorded = meta.get("ebm")
    if recorded is not None and recorded not in ENERGY_FORMS:
        raise CheckpointError(f"{path}: records an unknown energy form {recorded!r} (known: {', '.join(ENERGY_FORMS)})")
    if ebm is not None and recorded is not None and ebm != recorded:
        raise CheckpointError(f"{path}: was trained with --ebm {recorded}, not {ebm}; drop --ebm to use the recorded form")
    energy_form = recorded or ebm or "none"
    found = _config_from_metadata(meta) or infer_config(state, str(path))
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        wanted = config_for(arch, input_size=input_size or found.input_size, in_channels=found.in_channels,
                            num_classes=num_classes or found.num_classes, learn_sigma=found.learn_sigma)
        if (wanted.depth, wanted.hidden_size, wanted.patch_size) != (found.depth, found.hidden_size, found.patch_size):
            raise CheckpointError(f"{path}: checkpoint is {describe(found)}, not {arch}")
        found = replace(found, num_heads=wanted.num_heads, arch=arch)
    if input_size is not None and input_size != found.input_size:
        raise CheckpointError(f"{path}: checkpoint is for input size {found.input_size}, not {input_size}")
    if num_classes is not None and num_classes != found.num_classes:
        raise CheckpointError(f"{path}: checkpoint has {found.num_classes} classes, not {num_classes}")
    model = EqM(found)
    load_strict(model, state, str(path), network_name=describe(found), expects=f"{describe(found)} expects")
    spec = ModelSpec(
        config=found,
        guidance_mode=guidance_mode or meta.get("guidance_mode", "official"),
        codec=meta.get("codec", "sd-vae" if found.in_channels == 4 else "identity"),
        class_names=tuple(json.loads(meta["class_names"])) if "class_names" in meta else (),
        sampler_defaults=json.loads(meta["sampler_defaults"]) if "sampler_defaults" in meta else {},
        energy_form=energy_form,
    )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(model=model, spec=spec, source=str(path), field=field_for(model, energy_form))


def save_safetensors(model: EqM, spec: ModelSpec, path: str | os.PathLike, extra: dict[str, str] | None = None) -> None:
    """Write weights plus the metadata later loads need (no ``--arch``); atomic (tmp file + rename)."""
    path = Path(path)
    meta = {
        "format": METADATA_FORMAT,
        "arch": spec.config.arch,
        "config": json.dumps(spec.config.to_dict()),
        "input_size": str(spec.config.input_size),
        "num_classes": str(spec.config.num_classes),
        "guidance_mode": spec.guidance_mode,
        "codec": spec.codec,
    }
    if spec.class_names:
        meta["class_names"] = json.dumps(list(spec.class_names))
    if spec.sampler_defaults:
        meta["sampler_defaults"] = json.dumps(spec.sampler_defaults)
    meta["ebm"] = spec.energy_form
    meta.update(extra or {})
    write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, path, meta)


def convert(src: str | os.PathLike, dst: str | os.PathLike, arch: str | None = None, weights: str = "ema",
            guidance_mode: str = "official", ebm: str | None = None) -> LoadedModel:
    """Official ``.pt`` checkpoint -> safetensors with metadata (the energy form included). Returns the loaded model."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output name must end in .safetensors")
    if not dst.parent.exists():
        raise CheckpointError(f"{dst.parent}: output folder does not exist")
    loaded = load_model(src, arch=arch, weights=weights, guidance_mode=guidance_mode, ebm=ebm)
    save_safetensors(loaded.model, loaded.spec, dst, extra={"source_weights": weights})
    return loaded
