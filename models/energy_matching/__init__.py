"""Energy Matching (Balcerak et al. 2025): the scalar potential (``network``, its UNet in ``unet``), its
checkpoints (``checkpoint``), the bundled digits model (``digits``), and ``FAMILY``, what the registry asks."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from models.family import LoadedModel, ModelDescription, ModelSpec, SamplingDefaults
from models.files import CheckpointError
from models.heun_sde import HeunSDEParams

# The official CIFAR-10 setting (FID 3.3), HeunSDEParams' defaults: the Euler-Heun SDE, dt 0.01 to t_end
# 3.25, temperature 0.01 from t = 1 on. A file's recorded settings override these.
OFFICIAL_SAMPLER = asdict(HeunSDEParams())


class EnergyMatchingFamily:
    """Energy Matching files: official training checkpoints, bare state dicts, safetensors written here."""

    name = "energy-matching"

    def claims(self, path: Path) -> bool:
        from .checkpoint import is_energy_matching_file
        return is_energy_matching_file(path)

    def load(self, path: Path, *, weights: str = "ema", overrides: dict | None = None, device="cpu", dtype=None,
             **_ignored) -> LoadedModel:
        """The network (``overrides``: official training flags the file does not record); the EqM options
        (``arch``, ``guidance_mode``, ``ebm``) do not apply and are ignored."""
        import torch

        from .checkpoint import load_energy_matching
        from .network import EnergyMatchingField
        loaded = load_energy_matching(path, weights=weights, overrides=overrides, device=device,
                                      dtype=dtype or torch.float32)
        # What the file records over the official setting; the step count only where recorded, so that a
        # sampler given another dt keeps the official t_end (3.25) rather than its step count.
        rec = {**OFFICIAL_SAMPLER, **loaded.sampler_defaults}
        defaults = {"sampler": "heun-sde", "step_size": rec["dt"], "epsilon_max": rec["epsilon_max"],
                    "time_cutoff": rec["time_cutoff"], "grad_norm_threshold": rec["grad_norm_threshold"],
                    "cfg_scale": 1.0}
        if "max_steps" in loaded.sampler_defaults:
            defaults["max_steps"] = loaded.sampler_defaults["max_steps"]
        spec = ModelSpec(config=loaded.config, guidance_mode="all", codec="identity", sampler_defaults=defaults,
                         energy_form="potential")
        return LoadedModel(model=loaded.network, spec=spec, source=str(path), field=EnergyMatchingField(loaded.network))

    def describe(self, path: Path, **_) -> ModelDescription:
        """Pixel space, unconditional, the Heun SDE sampler."""
        from .checkpoint import infer_config, pick_weights, read_file
        from .network import EnergyMatchingConfig
        if path.suffix == ".safetensors":
            from models.files import read_metadata
            meta = read_metadata(path)
            config = EnergyMatchingConfig.from_dict(json.loads(meta["config"]))
        else:
            obj, meta = read_file(path)
            config = infer_config(pick_weights(obj, "ema", str(path)), str(path))
            del obj
        rec = {**OFFICIAL_SAMPLER, **json.loads(meta.get("sampler_defaults", "{}"))}
        defaults = SamplingDefaults(sampler="heun-sde", step_size=float(rec["dt"]), mu=0.0,
                                    max_steps=int(rec["max_steps"]), grad_norm_threshold=float(rec["grad_norm_threshold"]),
                                    guidance_scale=1.0, composition_guidance_scale=1.0,
                                    denoise_max_steps=int(rec["max_steps"]), epsilon_max=float(rec["epsilon_max"]),
                                    time_cutoff=float(rec["time_cutoff"]))
        return ModelDescription(family=self.name, config=config, codec="identity", guidance_mode="all",
                                class_names=(), defaults=defaults, energy_form="potential")

    def convert(self, src: Path, dst: Path, *, arch: str | None = None, weights: str = "ema",
                overrides: dict | None = None, **_ignored) -> str:
        from .checkpoint import load_energy_matching, save_energy_matching
        if dst.suffix != ".safetensors":
            raise CheckpointError(f"{dst}: the output name must end in .safetensors")
        if not dst.parent.exists():
            raise CheckpointError(f"{dst.parent}: output folder does not exist")
        if arch:
            raise CheckpointError("--arch names EqM sizes; an Energy Matching checkpoint takes --model-flag NAME=VALUE")
        loaded = load_energy_matching(src, weights=weights, overrides=overrides)
        save_energy_matching(loaded.network, dst, extra={"source_weights": weights},
                             sampler_defaults=loaded.sampler_defaults)
        c = loaded.config
        return (f"Energy Matching {c.arch} ({c.in_channels}x{c.input_size}x{c.input_size}, "
                f"UNet {c.num_channels} channels, ViT {c.transformer_nlayers}x{c.embed_dim}), {weights} weights")


FAMILY = EnergyMatchingFamily()
