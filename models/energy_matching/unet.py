"""The convolutional UNet trunk of Energy Matching's potential (the ADM / guided-diffusion UNet as
torchcfm's ``UNetModelWrapper`` builds it), written here with the same module tree, so an official
checkpoint's state-dict keys load with ``strict=True``.

Key layout (the contract with official checkpoints): ``time_embed.{0,2}``, ``input_blocks.N.M``,
``middle_block.{0,1,2}``, ``output_blocks.N.M``, ``out.{0,2}``; a residual block holds
``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}`` and, where the channel count changes,
``skip_connection``; an attention block ``norm``, ``qkv``, ``proj_out`` (1-D convolutions); a
resampler ``op`` (down) or ``conv`` (up).

Facts honoured: GroupNorm with 32 groups computed in float32; a sinusoidal time embedding
``[cos, sin]`` of ``model_channels`` features through Linear-SiLU-Linear to ``4 * model_channels``;
attention "at resolution r" means at downsampling factor ``image_size // r``; heads split before
q/k/v (``[head][q|k|v][channel]`` order of the qkv projection); the output convolution and every
block's last convolution start at zero (the official initialisation).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) evaluated in float32 whatever the activations' dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def time_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) times -> (N, dim) features ``[cos(t * f), sin(t * f)]``, f geometric from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                     # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _zeroed(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-dropout-conv, plus a (projected) skip."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)                                                   # (N, C', H, W)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, residual; heads of ``head_channels`` channels."""

    def __init__(self, channels: int, num_heads: int, head_channels: int):
        super().__init__()
        if head_channels != -1:
            if channels % head_channels:
                raise ValueError(f"attention channels {channels} are not a multiple of head channels {head_channels}")
            num_heads = channels // head_channels
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)                                           # (N, C, T)
        qkv = self.qkv(self.norm(flat))                                         # (N, 3C, T)
        # Heads first, then q|k|v inside each head: (N, heads, 3, C/heads, T).
        qkv = qkv.reshape(n, self.num_heads, 3, c // self.num_heads, h * w)
        q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))            # (N, heads, T, ch) each
        attended = F.scaled_dot_product_attention(q, k, v)                      # softmax(q k^T / sqrt(ch)) v
        attended = attended.transpose(-1, -2).reshape(n, c, h * w)              # (N, C, T)
        return (flat + self.proj_out(attended)).reshape(n, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A stage: residual blocks take the time embedding, the rest take only the activations."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:     # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """(N, C, H, W) images and (N,) times -> (N, C, H, W); channel counts ``model_channels * mult``."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int, num_res_blocks: int,
                 channel_mult: tuple[int, ...], attention_resolutions: tuple[int, ...], dropout: float,
                 num_heads: int, head_channels: int):
        super().__init__()
        self.model_channels = model_channels
        attention_factors = {image_size // r for r in attention_resolutions}
        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, head_channels)

        ch = first = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels, factor = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_channels, dropout, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if factor in attention_factors:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                factor *= 2
        self.middle_block = EmbedSequential(ResBlock(ch, emb_channels, dropout), attention(ch),
                                            ResBlock(ch, emb_channels, dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_channels, dropout, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if factor in attention_factors:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zeroed(nn.Conv2d(first, in_channels, 3, padding=1)))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(time_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)                                                      # (N, C, H, W)
