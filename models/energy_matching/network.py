"""Energy Matching (Balcerak et al. 2025): one scalar potential ``V(x)``, lower on data, whose negative
gradient ``-dV/dx`` is the velocity that carries noise to data.

The network (the official ``EBViTModelWrapper``): the UNet of ``em_unet`` evaluated at the fixed time
0.5 (the potential has no time input), a patch embedding of its output with learnable positions, a
post-norm transformer encoder (GELU, feed-forward 4x, batch first), a mean over patches, a linear map
to one number, times ``output_scale``, optionally soft-clamped ``c * tanh(V / c)``.

Official checkpoints (``train_cifar_multigpu.py``) are ``torch.save({"net_model", "ema_model", "sched",
"optim", "step"})``; sampling uses ``ema_model``. Their architecture is not in the file: it is the
training flags, whose defaults (``config_multigpu.py``) are ``EnergyMatchingConfig``'s defaults.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from .unet import UNet
from models.family import ExplicitEnergyField

FAMILY = "energy-matching"
UNET_TIME = 0.5          # the fixed dummy time the official potential feeds its UNet


@dataclass(frozen=True)
class EnergyMatchingConfig:
    """Architecture flags, with the official CIFAR-10 defaults (``config_multigpu.py``)."""

    input_size: int = 32
    in_channels: int = 3
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 4
    num_head_channels: int = 64
    dropout: float = 0.1
    patch_size: int = 4
    embed_dim: int = 384
    transformer_nheads: int = 4
    transformer_nlayers: int = 8
    output_scale: float = 1000.0
    energy_clamp: float | None = None
    arch: str = "EM-CIFAR10"

    # The seam's view of an unconditional model: no classes, label 0 for every row.
    num_classes: int = 0
    null_label: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("num_classes"), out.pop("null_label")
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "EnergyMatchingConfig":
        known = {f.name for f in fields(cls)} - {"num_classes", "null_label"}
        kw = {k: v for k, v in raw.items() if k in known}
        for key in ("channel_mult", "attention_resolutions"):
            if key in kw:
                kw[key] = tuple(int(v) for v in kw[key])
        return cls(**kw)


# One line per known architecture: the official CIFAR-10 network and the bundled 8x8 digits one.
ARCHITECTURES = {
    "EM-CIFAR10": EnergyMatchingConfig(),
    "EM-digits": EnergyMatchingConfig(input_size=8, in_channels=1, num_channels=32, num_res_blocks=1,
                                      channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2,
                                      num_head_channels=32, dropout=0.0, patch_size=2, embed_dim=64,
                                      transformer_nheads=4, transformer_nlayers=2, output_scale=1.0,
                                      arch="EM-digits"),
}


def parse_int_list(text: str) -> tuple[int, ...]:
    """'1,2,2,2' -> (1, 2, 2, 2) (the official flags' comma-separated form)."""
    return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, patches, D): non-overlapping patches through one strided conv, + positions."""

    def __init__(self, in_channels: int, patch_size: int, embed_dim: int, image_size: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2, embed_dim))
        nn.init.xavier_uniform_(self.patch_embed.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                                                 # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed                    # (N, T, D)


class EnergyMatchingNet(UNet):
    """x (N, C, H, W) -> V(x) (N,). Like the official class it *is* the UNet plus a head, so its
    state-dict keys are the official ones (UNet tensors at the top level, then the head's)."""

    def __init__(self, config: EnergyMatchingConfig):
        c = config
        if c.input_size % c.patch_size:
            raise ValueError(f"input size {c.input_size} is not a multiple of the patch size {c.patch_size}")
        super().__init__(c.input_size, c.in_channels, c.num_channels, c.num_res_blocks, c.channel_mult,
                         c.attention_resolutions, c.dropout, c.num_heads, c.num_head_channels)
        self.config = config
        self.patch_embed = PatchEmbed(c.in_channels, c.patch_size, c.embed_dim, c.input_size)
        layer = nn.TransformerEncoderLayer(d_model=c.embed_dim, nhead=c.transformer_nheads,
                                           dim_feedforward=4 * c.embed_dim, dropout=c.dropout,
                                           activation="gelu", batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=c.transformer_nlayers,
                                                         enable_nested_tensor=False)
        self.final_linear = nn.Linear(c.embed_dim, 1)

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), UNET_TIME, device=x.device, dtype=x.dtype)
        features = super().forward(t, x)                                              # (N, C, H, W)
        tokens = self.transformer_encoder(self.patch_embed(features))           # (N, T, D)
        energy = self.final_linear(tokens.mean(dim=1)).view(-1) * self.config.output_scale   # (N,)
        if self.config.energy_clamp is not None:
            energy = self.config.energy_clamp * torch.tanh(energy / self.config.energy_clamp)
        return energy

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:   # type: ignore[override]
        """V(x); ``y`` (labels) is accepted and ignored: the potential is unconditional."""
        return self.potential(x)


class EnergyMatchingField(ExplicitEnergyField):
    """The model seam's view of the network: rows -> energy ``V`` (lower on data), direction ``-dV/dx``.
    The potential is unconditional: the rows' labels are ignored."""

    energy_form = "potential"

    def row_energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._forward(x, y)                                              # (N,) = V(x)
