"""Energy Matching checkpoints: the official training format, bare state dicts and safetensors.

An official file is ``{"net_model", "ema_model", "sched", "optim", "step"}`` (``ema_model`` is what
the official sampler loads, and the default here). Its architecture is not stored: what the tensor
shapes tell (input channels and size, UNet base width, ViT width, depth and patch) is read off them;
the rest are the official training flags' defaults (``EnergyMatchingConfig``), overridable by name
(``num_heads=8``, ``channel_mult=1,2,2``), and the weights then load with ``strict=True``. A
safetensors file written by ``eqm convert`` carries the whole config in its metadata.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from models.files import CheckpointError, load_strict, read_checkpoint_file, write_safetensors
from .network import ARCHITECTURES, FAMILY, EnergyMatchingConfig, EnergyMatchingNet, parse_int_list

METADATA_FORMAT = "eqm-safetensors/1"
OFFICIAL_WEIGHTS = {"ema": "ema_model", "model": "net_model"}
_MARKER_KEYS = ("final_linear.weight", "time_embed.0.weight", "patch_embed.pos_embed")


def looks_like_energy_matching(obj: dict, meta: dict[str, str] | None = None) -> bool:
    """Whether a loaded checkpoint (dict) or safetensors metadata is of this family."""
    if meta and meta.get("family") == FAMILY:
        return True
    if any(k in obj for k in OFFICIAL_WEIGHTS.values()):
        return True
    return all(k in obj for k in _MARKER_KEYS)


def is_energy_matching_file(path) -> bool:
    """Whether the file holds an Energy Matching model (read lazily: tensors are not loaded)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False                       # the regular loader reports the problem
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as fh:
                return looks_like_energy_matching({k: None for k in fh.keys()}, dict(fh.metadata() or {}))
        except (SafetensorError, OSError, ValueError):
            return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:                       # not loadable lazily: the regular loader reports why
        return False
    return isinstance(obj, dict) and looks_like_energy_matching(obj)


def read_file(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(the raw checkpoint dict, safetensors metadata or {}); one-line errors for unreadable files."""
    return read_checkpoint_file(path)


def pick_weights(obj: dict, weights: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict of ``weights`` (``ema``/``model``) in an official file, or the bare dict itself."""
    if weights not in OFFICIAL_WEIGHTS:
        raise CheckpointError(f"--weights must be 'ema' or 'model', not {weights!r}")
    if any(k in obj for k in OFFICIAL_WEIGHTS.values()):
        key = OFFICIAL_WEIGHTS[weights]
        if not isinstance(obj.get(key), dict):
            held = ", ".join(sorted(str(k) for k in obj))
            raise CheckpointError(f"{source}: has no {key!r} state dict (it holds {held})")
        obj = obj[key]
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{source}: not a checkpoint (no tensors found)")
    return state


def infer_config(state: dict[str, torch.Tensor], source: str) -> EnergyMatchingConfig:
    """The official defaults, with what the tensor shapes fix read off them."""
    missing = [k for k in _MARKER_KEYS + ("patch_embed.patch_embed.weight", "input_blocks.0.0.weight") if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not an Energy Matching checkpoint (missing {', '.join(missing)})")
    embed_dim, in_channels, patch, _ = state["patch_embed.patch_embed.weight"].shape
    tokens = state["patch_embed.pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer_encoder.layers.")})
    base = ARCHITECTURES["EM-CIFAR10"]
    return replace(base, input_size=grid * patch, in_channels=in_channels,
                   num_channels=state["time_embed.0.weight"].shape[1], embed_dim=embed_dim, patch_size=patch,
                   transformer_nlayers=layers, arch="EM-CIFAR10" if (grid * patch, in_channels) == (32, 3) else "custom")


OVERRIDABLE = {f.name for f in fields(EnergyMatchingConfig)} - {"arch", "num_classes", "null_label"}


def apply_overrides(config: EnergyMatchingConfig, overrides: dict[str, str] | None) -> EnergyMatchingConfig:
    """Official flag names -> values (strings as on the official command line)."""
    if not overrides:
        return config
    kw: dict[str, object] = {}
    for name, text in overrides.items():
        if name not in OVERRIDABLE:
            raise CheckpointError(f"unknown architecture flag {name!r}; known: {', '.join(sorted(OVERRIDABLE))}")
        current = getattr(config, name)
        try:
            if name in ("channel_mult", "attention_resolutions"):
                kw[name] = parse_int_list(text)
            elif name == "energy_clamp":
                kw[name] = None if str(text).lower() in ("", "none") else float(text)
            elif isinstance(current, int):
                kw[name] = int(text)
            else:
                kw[name] = float(text)
        except ValueError:
            raise CheckpointError(f"architecture flag {name}={text!r} is not a valid value") from None
    return replace(config, **kw)


@dataclass
class LoadedEnergyModel:
    network: EnergyMatchingNet
    config: EnergyMatchingConfig
    source: str
    sampler_defaults: dict


def load_energy_matching(path: str | os.PathLike, weights: str = "ema", overrides: dict[str, str] | None = None, *,
                         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         raw: tuple[dict, dict[str, str]] | None = None) -> LoadedEnergyModel:
    """Build the network the file (plus ``overrides``) describes and load it with ``strict=True``."""
    source = str(path)
    obj, meta = raw if raw is not None else read_file(path)
    state = pick_weights(obj, weights, source)
    if "config" in meta:
        config = EnergyMatchingConfig.from_dict(json.loads(meta["config"]))
    else:
        config = infer_config(state, source)
    config = apply_overrides(config, overrides)
    try:
        network = EnergyMatchingNet(config)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    load_strict(network, state, source, network_name="the Energy Matching network of these flags",
                expects="the flags give", hint=" (set the training flags with --model-flag NAME=VALUE)")
    network = network.to(device=device, dtype=dtype).eval().requires_grad_(False)
    defaults = json.loads(meta["sampler_defaults"]) if "sampler_defaults" in meta else {}
    return LoadedEnergyModel(network=network, config=config, source=source, sampler_defaults=defaults)


def save_energy_matching(network: EnergyMatchingNet, path: str | os.PathLike, extra: dict[str, str] | None = None,
                         sampler_defaults: dict | None = None) -> None:
    """Weights plus the whole architecture as metadata; atomic (tmp file + rename)."""
    path = Path(path)
    meta = {"format": METADATA_FORMAT, "family": FAMILY, "arch": network.config.arch,
            "config": json.dumps(network.config.to_dict()), "input_size": str(network.config.input_size),
            "num_classes": "0", "codec": "identity"}
    if sampler_defaults:
        meta["sampler_defaults"] = json.dumps(sampler_defaults)
    meta.update(extra or {})
    write_safetensors({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()},
                      path, meta)
