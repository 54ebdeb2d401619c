"""The family registry: each family claims, describes and loads its own files; a new family is one
object registered, and everything above ``models/`` (the API's model description, sampling) serves it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import models
from models import registry
from models.files import CheckpointError
from models.family import ExplicitEnergyField, LoadedModel, ModelDescription, ModelSpec, SamplingDefaults
from models.sampler import Condition, SamplerParams, sample
from test_imports import import_graph

FAMILY_FOLDERS = ("models.eqm", "models.energy_matching")


# -- a third family, defined here: a quadratic bowl around a point the file records ---------------------
@dataclass(frozen=True)
class BowlConfig:
    in_channels: int = 1
    input_size: int = 4
    num_classes: int = 0
    null_label: int = 0
    arch: str = "bowl"


class Bowl(torch.nn.Module):
    def __init__(self, centre: float):
        super().__init__()
        self.config = BowlConfig()
        self.centre = torch.nn.Parameter(torch.tensor(centre), requires_grad=False)

    def forward(self, x, y=None):
        return 0.5 * ((x - self.centre) ** 2).sum(dim=(1, 2, 3))          # (N,) energy, lowest at the centre


class BowlField(ExplicitEnergyField):
    energy_form = "bowl"

    def row_energy(self, x, y):
        return self._forward(x, y)


class BowlFamily:
    name = "bowl"

    def claims(self, path: Path) -> bool:
        return path.suffix == ".bowl"

    def _centre(self, path: Path) -> float:
        return float(json.loads(path.read_text())["centre"])

    def describe(self, path: Path, **_) -> ModelDescription:
        defaults = SamplingDefaults(sampler="gd", step_size=0.5, mu=0.0, max_steps=40, grad_norm_threshold=1e-4,
                                    guidance_scale=1.0, composition_guidance_scale=1.0, denoise_max_steps=40)
        return ModelDescription(family=self.name, config=BowlConfig(), codec="identity", guidance_mode="all",
                                class_names=(), defaults=defaults, energy_form="bowl")

    def load(self, path: Path, device="cpu", dtype=None, **_) -> LoadedModel:
        net = Bowl(self._centre(path)).to(device)
        return LoadedModel(model=net, spec=ModelSpec(config=net.config, guidance_mode="all", codec="identity",
                                                     energy_form="bowl"),
                           source=str(path), field=BowlField(net))

    def convert(self, src: Path, dst: Path, **_) -> str:
        dst.write_text(src.read_text())
        return "a bowl"


@pytest.fixture
def bowl(tmp_path):
    family = BowlFamily()
    registry.register(family)
    path = tmp_path / "model.bowl"
    path.write_text(json.dumps({"centre": 0.25}))
    yield path
    registry.unregister(family)


def test_a_family_registered_from_outside_loads_describes_and_samples(bowl):
    assert registry.family_for(bowl).name == "bowl"
    desc = models.describe_model(bowl)
    assert (desc.family, desc.sample_shape, desc.energy_form) == ("bowl", (1, 4, 4), "bowl")
    loaded = models.load_model(str(bowl))
    start = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(loaded.field, start, [Condition()] * 3, SamplerParams(sampler="gd", step_size=0.5, max_steps=40),
                 null_label=0, guided_channels=1)
    assert torch.allclose(out.latents, torch.full_like(out.latents, 0.25), atol=1e-4)
    assert max(out.energies) < 1e-6                                     # the bowl's own energy, reported


def test_the_api_describes_a_family_it_has_never_heard_of(bowl):
    from service.api.modelinfo import load_model_info
    from service.settings import Settings
    info = load_model_info(Settings(checkpoint=str(bowl)))
    assert (info.image_size, info.channels, info.num_classes, info.has_energy) == (4, 1, 0, True)
    assert info.defaults.sampler == "gd" and info.defaults.max_steps == 40


def test_without_its_registration_the_file_is_not_claimed(tmp_path):
    path = tmp_path / "model.bowl"
    path.write_text(json.dumps({"centre": 0.25}))
    assert registry.family_for(path).name == "eqm"                       # the last family, which reports why
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        models.load_model(path)


@pytest.mark.parametrize("name, family, energy", [("digits", "eqm", "none"), ("digits-e", "eqm", "dot"),
                                                  ("em-digits", "energy-matching", "potential")])
def test_bundled_models_are_claimed_by_their_family_and_described_as_loaded(name, family, energy):
    desc = models.describe_model(name)
    loaded = models.load_model(name)
    assert (desc.family, desc.energy_form, loaded.spec.energy_form) == (family, energy, energy)
    c = loaded.spec.config
    assert desc.sample_shape == (c.in_channels, c.input_size, c.input_size)
    assert desc.codec == loaded.spec.codec and desc.guidance_mode == loaded.spec.guidance_mode
    assert loaded.field.has_energy == (energy != "none")


# Imports of a family's folder from outside it, each with its reason; nothing else may import one.
FAMILY_IMPORTS_ALLOWED = {
    "models.registry": "the registry lists the families",
    "service.cli.train_digits": "the command that trains the bundled EqM digits model",
    "models.energy_matching.digits": "the Energy Matching digits trainer shares the digits training schedule",
    "models.warm_start": "retrains each bundled energy model from trained weights of its family",
}


def test_nothing_outside_a_family_folder_imports_it():
    graph = import_graph()
    offenders = []
    for module, targets in graph.items():
        home = next((f for f in FAMILY_FOLDERS if module == f or module.startswith(f + ".")), None)
        for target in targets:
            family = next((f for f in FAMILY_FOLDERS if target == f or target.startswith(f + ".")), None)
            if family and family != home and module not in FAMILY_IMPORTS_ALLOWED:
                offenders.append(f"{module} -> {target}")
    assert offenders == []
