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
- A family is one module in ``models/`` that knows its network, its checkpoint format and its defaults,
  and builds its ``GradientField``; ``models.checkpoint.load_model`` returns it as ``LoadedModel.field``.
  The update rule itself (GD, NAG-GD, an SDE schedule) belongs to the sampler, never to the field.

Families here: ``ImplicitField`` (EqM: the network's output is the direction) and ``EqMEnergyField``
(EqM-E, the official ``--ebm dot|mean|l2``: the network output ``o`` defines ``E = sum(o * x)`` (dot,
mean) or ``E = -sum(o**2) / 2`` (l2); the direction is ``dE/dx``; the reported energy is ``-E``, what
the official ``forward(get_energy=True)`` returns). ``ExplicitEnergyField`` is the base of every family
with an energy: it only needs ``row_energy``.
"""
from __future__ import annotations

from typing import Callable

import torch

ENERGY_FORMS = ("none", "dot", "l2", "mean")     # the official train.py --ebm choices; "none" = implicit EqM


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


class EqMEnergyField(ExplicitEnergyField):
    """EqM-E (official ``--ebm``): the network output ``o`` defines the energy ``-E`` with
    ``E = sum(o * x)`` (dot, mean) or ``E = -sum(o**2) / 2`` (l2), summed over C, H, W."""

    def __init__(self, network: torch.nn.Module, form: str):
        if form not in ENERGY_FORMS or form == "none":
            raise ValueError(f"energy form must be one of dot, l2, mean, not {form!r}")
        super().__init__(network)
        self.energy_form = form

    def row_energy(self, x, y):
        out = self._forward(x, y).float()                                       # (N, C, H, W)
        if self.energy_form == "l2":
            official = -(out * out).sum(dim=(1, 2, 3)) / 2
        else:                       # dot and mean: the official code computes both the same way
            official = (out * x.float()).sum(dim=(1, 2, 3))
        return -official            # the official get_energy sign: lower on data


def field_for(network: torch.nn.Module, energy_form: str = "none") -> GradientField:
    """The field of an EqM network with energy form ``none`` (implicit) or an official ``--ebm`` form."""
    if energy_form not in ENERGY_FORMS:
        raise ValueError(f"energy form must be one of {', '.join(ENERGY_FORMS)}, not {energy_form!r}")
    return ImplicitField(network) if energy_form == "none" else EqMEnergyField(network, energy_form)


def as_field(model) -> GradientField:
    """A field as it is, a bare network as the implicit field of its output."""
    return model if isinstance(model, GradientField) else ImplicitField(model)
