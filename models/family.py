"""The model seam: what the sampler, runner and engine ask of any model family.

Contract (everything above this module relies on it and on nothing else about the network):

- A family's model is a ``GradientField``. ``field.direction(x, y)`` takes a batch of rows,
  ``x`` (N, C, H, W) in the field's dtype on its device and ``y`` (N,) long labels (the null label
  for an unconditional row), and returns the **update direction** of every row, (N, C, H, W), in the
  sign the samplers use: ``x <- x + eta * direction`` descends. Rows are independent: the result for
  a row does not depend on the other rows of the batch (so padding, packing and chunking are free).
- ``field.has_energy`` says whether the family defines a scalar energy. Where it does,
  ``field.energy(x, y)`` returns one float32 value per row, (N,), **lower on data**, and
  ``direction = -d energy / d x`` exactly (up to float rounding); ``direction_and_energy`` returns both
  from one evaluation. Where it does not (implicit EqM), ``energy`` returns ``None``.
- Guidance and composition are the sampler's business: it combines the directions of a sample's rows
  with weights ``w_k`` (``sum_k w_k d_k``), and reports a sample's energy as the same weighted sum of
  its rows' energies (the energy whose gradient it descended, for all guided channels).
- Calls are pure and keep no state: an explicit family builds its autograd graph inside the call
  (also under ``torch.no_grad``) and drops it before returning; nothing is kept past the step.
- ``field.sample_shape`` is (C, H, W) of one row, ``field.null_label`` the label of the unconditional
  row, ``field.num_classes`` the number of real labels; ``field.device`` / ``field.dtype`` where rows
  must be. ``field.use_forward(fn)`` swaps the network call for a compiled one (same signature).
- A family is one folder in ``models/`` (``models/eqm/``, ``models/energy_matching/``) that knows its
  network, its checkpoint format and its defaults; its package's ``FAMILY`` (a ``Family``) claims,
  describes and loads its files, and ``models.registry`` asks the families in turn. ``load_model``
  returns a ``LoadedModel`` whose ``field`` is the family's ``GradientField``.
  The update rule itself (GD, NAG-GD, an SDE schedule) belongs to the sampler, never to the field.

Bases here: ``ImplicitField`` (the network's output is the direction, as in EqM) and
``ExplicitEnergyField``, the base of every family with an energy: it only needs ``row_energy``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

class GradientField:
    """A network seen as a field of update directions over rows (see the module contract)."""

    has_energy = False
    energy_form = "none"

    def __init__(self, network: torch.nn.Module):
        self.network = network
        self._forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = network

    # -- what the network is --------------------------------------------------------------------
    @property
    def config(self):
        return self.network.config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.network.config
        return (cfg.in_channels, cfg.input_size, cfg.input_size)

    @property
    def null_label(self) -> int:
        return self.network.config.null_label

    @property
    def num_classes(self) -> int:
        return self.network.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def parameters(self):
        return self.network.parameters()

    def use_forward(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Run the network through ``forward`` from now on (e.g. its ``torch.compile``d form)."""
        self._forward = forward

    # -- the seam -------------------------------------------------------------------------------
    def direction(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.direction_and_energy(x, y, want_energy=False)[0]

    def energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None

    def direction_and_energy(self, x: torch.Tensor, y: torch.Tensor,
                             want_energy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.direction(x, y)


class ImplicitField(GradientField):
    """Implicit EqM: the network predicts the descent direction itself; there is no energy."""

    def direction_and_energy(self, x, y, want_energy=True):
        return self._forward(x, y), None


class ExplicitEnergyField(GradientField):
    """A family with a scalar energy per row: the direction is ``-d energy / dx`` by autograd.

    Subclasses implement ``row_energy(x, y)``: the (N,) energy, lower on data, as a differentiable
    function of ``x``. The graph lives only inside ``direction_and_energy``; parameters stay frozen
    (``requires_grad`` False), so the backward computes the input gradient only.
    """

    has_energy = True

    def row_energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def direction_and_energy(self, x, y, want_energy=True):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            energy = self.row_energy(x_in, y)                                   # (N,)
            # Rows are independent, so the gradient of the sum is each row's own gradient.
            (grad,) = torch.autograd.grad(energy.sum(), x_in)
        return (-grad).detach(), energy.detach().float() if want_energy else None

    @torch.no_grad()
    def energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.row_energy(x, y).float()

    def training_direction(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The direction with its graph kept (``create_graph``), for a loss on it; training only."""
        x_in = x if x.requires_grad else x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.row_energy(x_in, y).sum(), x_in, create_graph=True)
        return -grad


def as_field(model) -> GradientField:
    """A field as it is, a bare network as the implicit field of its output."""
    return model if isinstance(model, GradientField) else ImplicitField(model)


# -- what a family hands the registry -------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run a loaded network: its architecture and how to guide and decode it."""

    config: object                       # the family's architecture dataclass (in_channels, input_size, classes)
    guidance_mode: str = "official"      # "official" = first 3 channels (released EqM weights), "all" = every channel
    codec: str = "sd-vae"                # "sd-vae" (latents of the SD VAE) or "identity" (pixel space)
    class_names: tuple[str, ...] = ()    # optional, index = label
    # Recommended sampler settings of this model (SamplerParams fields + "cfg_scale"); empty = paper's XL/2 ones.
    sampler_defaults: dict = field(default_factory=dict, compare=False)
    energy_form: str = "none"            # "none" = no energy; EqM-E "dot" | "l2" | "mean"; "potential" = Energy Matching

    @property
    def guided_channels(self) -> int:
        if self.guidance_mode == "official":
            return min(3, self.config.in_channels)
        return self.config.in_channels


@dataclass
class LoadedModel:
    model: torch.nn.Module     # the network (weights, config)
    spec: ModelSpec
    source: str
    field: GradientField       # the model seam: what samplers call


@dataclass(frozen=True)
class SamplingDefaults:
    """What a sample gets for every setting it leaves out (a model's recommended settings, complete)."""

    sampler: str
    step_size: float
    mu: float
    max_steps: int
    grad_norm_threshold: float
    guidance_scale: float
    composition_guidance_scale: float
    denoise_max_steps: int
    epsilon_max: float = 0.0          # heun-sde settings (Energy Matching models)
    time_cutoff: float = 1.0


@dataclass(frozen=True)
class ModelDescription:
    """What a checkpoint holds, read without building the network."""

    family: str
    config: object                  # the family's architecture dataclass (in_channels, input_size, num_classes)
    codec: str                      # "identity" (pixel space) or "sd-vae" (latents)
    guidance_mode: str
    class_names: tuple[str, ...]
    defaults: SamplingDefaults
    energy_form: str = "none"       # "none" = no energy (gradient-norm score)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.input_size, c.input_size)


class Family(Protocol):
    """A model family as the registry sees it (``models/registry.py``)."""

    name: str

    def claims(self, path: Path) -> bool:
        """Whether ``path`` is a file of this family (cheap: a header or lazily mapped keys)."""

    def describe(self, path: Path, **options) -> ModelDescription:
        """The file's description; a ``CheckpointError`` says what is wrong with it."""

    def load(self, path: Path, **options) -> LoadedModel:
        """The network with its weights (``strict``), its spec and its field."""

    def convert(self, src: Path, dst: Path, **options) -> str:
        """``src`` -> safetensors at ``dst`` with the metadata loads need; a one-line summary."""
