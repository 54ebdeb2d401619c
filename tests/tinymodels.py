"""Small EqM networks with random weights for tests (no trained checkpoint needed)."""
from __future__ import annotations

import torch

from models.eqm.network import EqM, EqMConfig

# One-channel 8x8 latents, two blocks: the engine, packing and worker tests' network.
TINY = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, learn_sigma=False)


def random_model(cfg: EqMConfig = TINY, seed: int = 0) -> EqM:
    """``EqM(cfg)`` with every weight moved by 0.05 N(0, 1), in eval mode without gradients. The DiT
    initialisation zeroes the adaLN and output layers, which would make the field trivially 0."""
    torch.manual_seed(seed)
    model = EqM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)
