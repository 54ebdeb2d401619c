"""EqM, implicit or with an explicit energy (EqM-E): the transformer (``network``), its energy forms
(``field``), its checkpoints (``checkpoint``), the bundled digits model (``digits``), and ``FAMILY``,
what the registry asks."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from models.family import LoadedModel, ModelDescription, SamplingDefaults
from models.files import CheckpointError, read_metadata

PAPER_GUIDANCE_SCALE = 1.5       # the paper's headline setting (EqM-XL/2, FID 1.90)


class EqMFamily:
    """EqM files: official ``train.py`` checkpoints, bare state dicts, safetensors written here."""

    name = "eqm"

    def claims(self, path: Path) -> bool:
        return True          # the last family asked: its loader says what is wrong with a file of no family

    def load(self, path: Path, *, arch: str | None = None, weights: str = "ema", guidance_mode: str | None = None,
             ebm: str | None = None, device="cpu", dtype=None, overrides: dict | None = None, **size) -> LoadedModel:
        import torch

        from .checkpoint import load_model
        return load_model(path, arch=arch, weights=weights, guidance_mode=guidance_mode, device=device,
                          dtype=dtype or torch.float32, ebm=ebm, **size)

    def describe(self, path: Path, *, ebm: str | None = None, **_) -> ModelDescription:
        from .checkpoint import _config_from_metadata, infer_config, read_state_dict
        from .field import ENERGY_FORMS
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        config = _config_from_metadata(meta)
        if config is None:
            state, meta = read_state_dict(path)
            config = infer_config(state, str(path))
            del state
        recorded = meta.get("ebm")
        if ebm and recorded and ebm != recorded:
            raise CheckpointError(f"{path}: was trained with --ebm {recorded}, not {ebm}; unset EQM_EBM / --ebm")
        if ebm and ebm not in ENERGY_FORMS:
            raise CheckpointError(f"unknown energy form EQM_EBM={ebm!r}; choose one of {', '.join(ENERGY_FORMS)}")
        return ModelDescription(
            family=self.name, config=config,
            codec=meta.get("codec", "sd-vae" if config.in_channels == 4 else "identity"),
            guidance_mode=meta.get("guidance_mode", "official"),
            class_names=tuple(json.loads(meta["class_names"])) if "class_names" in meta else (),
            defaults=defaults_for(config, json.loads(meta.get("sampler_defaults", "{}"))),
            energy_form=recorded or ebm or "none")

    def convert(self, src: Path, dst: Path, *, arch: str | None = None, weights: str = "ema",
                guidance_mode: str = "official", ebm: str | None = None, overrides: dict | None = None) -> str:
        from .checkpoint import convert, describe
        loaded = convert(src, dst, arch=arch, weights=weights, guidance_mode=guidance_mode, ebm=ebm)
        return (f"{describe(loaded.spec.config)}, {weights} weights, guidance on {loaded.spec.guided_channels} "
                f"channels, energy form {loaded.spec.energy_form}")


def defaults_for(config, recorded: dict) -> SamplingDefaults:
    """The checkpoint's recorded settings (``eqm sample`` uses the same) > the digits model's > the paper's."""
    from models.sampler import SamplerParams

    from .digits import DIGITS_DEFAULTS, digits_config
    p = SamplerParams()      # the paper's EqM-XL/2 setting: NAG-GD, eta 0.0017, mu 0.3, 249 updates
    base = dict(sampler=p.sampler, step_size=p.step_size, mu=p.mu, max_steps=p.max_steps,
                grad_norm_threshold=p.grad_norm_threshold, cfg_scale=PAPER_GUIDANCE_SCALE)
    composition_scale, denoise_steps = PAPER_GUIDANCE_SCALE, None
    if config.arch == digits_config().arch:
        d = DIGITS_DEFAULTS
        base.update(asdict(d.adaptive()), cfg_scale=d.cfg_scale)
        composition_scale, denoise_steps = d.composition_cfg_scale, d.denoise_steps
    base.update({k: v for k, v in recorded.items() if k in base})
    return SamplingDefaults(sampler=base["sampler"], step_size=float(base["step_size"]), mu=float(base["mu"]),
                            max_steps=int(base["max_steps"]), grad_norm_threshold=float(base["grad_norm_threshold"]),
                            guidance_scale=float(base["cfg_scale"]), composition_guidance_scale=composition_scale,
                            denoise_max_steps=denoise_steps or int(base["max_steps"]))


FAMILY = EqMFamily()
