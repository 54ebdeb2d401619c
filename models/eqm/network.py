"""The EqM transformer: a SiT/DiT backbone with adaLN-Zero that predicts a time-invariant gradient field.

Parameter names and shapes match the official EqM checkpoints (timm module layout), so the released
weights load with ``strict=True``. The network takes no timestep: the official model is trained with
``uncond=True``, which feeds ``t = 0`` to the timestep embedder, so its output is one constant vector.
Sign convention: the output is the descent direction (about ``-grad E``); samplers do ``x <- x + eta * out``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                   Embeddings                                  #
#################################################################################

class PatchEmbed(nn.Module):
    """Splits an image into p x p patches and projects each to the hidden size (a strided conv)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                          # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)       # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a scalar followed by a two-layer MLP (kept for checkpoint compatibility)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)     # (N, 2*half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)                     # (N, D)


class LabelEmbedder(nn.Module):
    """Class-label table; the extra last row (index ``num_classes``) is the null label used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)       # (N, D)


#################################################################################
#                                     Blocks                                    #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: ``qkv``, ``proj``)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                   # (N, heads, T, D/heads) each
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(n, t, d)    # (N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm layout: ``fc1``, ``fc2``)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=True)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EqMBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: the condition sets shift, scale and gate."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))   # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))    # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens back to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))   # (N, T, p*p*C_out)


#################################################################################
#                                     Model                                     #
#################################################################################

@dataclass(frozen=True)
class EqMConfig:
    """Architecture of one EqM network; ``arch`` names the preset it came from (or ``custom``)."""

    arch: str = "EqM-XL/2"
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_label(self) -> int:
        """Index of the null (unconditional) label used for classifier-free guidance."""
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)


class EqM(nn.Module):
    """EqM gradient-field network: ``forward(x, y)`` returns the descent direction at ``x`` for labels ``y``."""

    def __init__(self, config: EqMConfig):
        super().__init__()
        if config.input_size % config.patch_size:
            raise ValueError(f"input_size {config.input_size} is not a multiple of patch_size {config.patch_size}")
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}")
        self.config = config
        grid = config.input_size // config.patch_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed 2-D sin-cos table; a (non-trainable) parameter because the checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            EqMBlock(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, sin-cos positions, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = self.config.input_size // self.config.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents, y: (N,) labels (``num_classes`` = null) -> (N, C, H, W) descent direction."""
        h = self.x_embedder(x) + self.pos_embed                # (N, T, D)
        t = self.t_embedder(x.new_zeros(1))                    # (1, D): t is always 0 (time-invariant field)
        c = t + self.y_embedder(y)                             # (N, D)
        for block in self.blocks:
            h = block(h, c)                                    # (N, T, D)
        h = self.final_layer(h, c)                             # (N, T, p*p*C_out)
        out = self.unpatchify(h)                               # (N, C_out, H, W)
        # learn_sigma checkpoints emit 2*C channels; only the first C are the gradient field.
        return out[:, : self.config.in_channels] if self.config.learn_sigma else out

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) patch tokens -> (N, C, H, W) image, patches in row-major order."""
        c, p = self.config.out_channels, self.config.patch_size
        g = int(round(h.shape[1] ** 0.5))
        h = h.reshape(h.shape[0], g, g, p, p, c)               # (N, gh, gw, p, q, C)
        h = torch.einsum("nhwpqc->nchpwq", h)                  # (N, C, gh, p, gw, q)
        return h.reshape(h.shape[0], c, g * p, g * p)


#################################################################################
#                                    Helpers                                    #
#################################################################################

def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid*grid, dim) table, tokens row-major; as in the official (MAE) table the first half encodes
    the column coordinate and the second half the row coordinate."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be a multiple of 4 for the 2-D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)                 # h index of each token (row-major)
    cols = coords.repeat(grid_size)                            # w index of each token
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = pos[:, None] * omega[None]                        # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


#################################################################################
#                                   Registry                                    #
#################################################################################

# name -> (depth, hidden_size, patch_size, num_heads); ImageNet 256 defaults (32x32x4 latents, 1000 classes).
ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    "EqM-XL/2": (28, 1152, 2, 16), "EqM-XL/4": (28, 1152, 4, 16), "EqM-XL/8": (28, 1152, 8, 16),
    "EqM-L/2":  (24, 1024, 2, 16), "EqM-L/4":  (24, 1024, 4, 16), "EqM-L/8":  (24, 1024, 8, 16),
    "EqM-B/2":  (12, 768, 2, 12),  "EqM-B/4":  (12, 768, 4, 12),  "EqM-B/8":  (12, 768, 8, 12),
    "EqM-S/2":  (12, 384, 2, 6),   "EqM-S/4":  (12, 384, 4, 6),   "EqM-S/8":  (12, 384, 8, 6),
}


def config_for(arch: str, **overrides) -> EqMConfig:
    """The config of a named architecture, e.g. ``config_for("EqM-B/2", input_size=64)``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    depth, hidden, patch, heads = ARCHITECTURES[arch]
    base = EqMConfig(arch=arch, depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    return replace(base, **overrides)


def arch_name(depth: int, hidden_size: int, patch_size: int) -> str | None:
    """The registry name of a (depth, hidden, patch) triple, or None for a custom shape."""
    for name, (d, h, p, _) in ARCHITECTURES.items():
        if (d, h, p) == (depth, hidden_size, patch_size):
            return name
    return None
