"""EqM-E (official ``train.py --ebm dot|mean|l2``): the energy an EqM network's output defines.

The network output ``o`` defines ``E = sum(o * x)`` (dot, mean) or ``E = -sum(o**2) / 2`` (l2); the
direction is ``dE/dx``; the reported energy is ``-E``, what the official ``forward(get_energy=True)``
returns. Without an energy form (``none``) the field is implicit: the output is the direction.
"""
from __future__ import annotations

import torch

from models.family import ExplicitEnergyField, GradientField, ImplicitField

ENERGY_FORMS = ("none", "dot", "l2", "mean")     # the official train.py --ebm choices; "none" = implicit EqM


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
