"""The EqM network: official key/shape layout for every size, positions, forward semantics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.eqm.network import ARCHITECTURES, EqM, EqMConfig, config_for
from tinymodels import random_model

# Published sizes (depth, hidden, heads) of the official configs, per family.
FAMILIES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def expected_layout(depth: int, hidden: int, patch: int, in_ch: int = 4, classes: int = 1000,
                    input_size: int = 32, learn_sigma: bool = True) -> dict[str, tuple[int, ...]]:
    """The official state-dict layout (timm module names), written out from the architecture facts."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    tokens = (input_size // patch) ** 2
    layout = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return layout


def test_registry_has_the_twelve_official_sizes():
    names = {f"EqM-{fam}/{p}" for fam in FAMILIES for p in (2, 4, 8)}
    assert set(ARCHITECTURES) == names
    for name, (depth, hidden, patch, heads) in ARCHITECTURES.items():
        fam = name.split("-")[1].split("/")[0]
        assert (depth, hidden, heads) == FAMILIES[fam]
        assert patch == int(name.split("/")[1])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_state_dict_layout_matches_official(name):
    depth, hidden, patch, _ = ARCHITECTURES[name]
    with torch.device("meta"):     # shapes only: no memory for the XL weights
        model = EqM(config_for(name))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_layout(depth, hidden, patch)


def test_layout_follows_input_size_channels_and_classes():
    cfg = config_for("EqM-B/4", input_size=64, in_channels=3, num_classes=10, learn_sigma=False)
    with torch.device("meta"):
        got = {k: tuple(v.shape) for k, v in EqM(cfg).state_dict().items()}
    assert got == expected_layout(12, 768, 4, in_ch=3, classes=10, input_size=64, learn_sigma=False)


def _mae_sincos(dim: int, grid: int) -> np.ndarray:
    """The MAE/DiT 2-D table as published: meshgrid(w, h), first half from grid[0]."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, mesh[0]), one(dim // 2, mesh[1])], axis=1)


def test_pos_embed_is_the_official_sincos_table():
    model = EqM(EqMConfig(arch="custom", input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=1,
                          num_heads=4, num_classes=10))
    expected = torch.from_numpy(_mae_sincos(64, 8)).float()
    torch.testing.assert_close(model.pos_embed[0], expected, rtol=0, atol=1e-6)


def tiny(learn_sigma: bool = True, seed: int = 0) -> EqM:
    return random_model(EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                  num_heads=4, num_classes=10, learn_sigma=learn_sigma), seed)


def test_forward_shape_and_learn_sigma_half():
    model = tiny()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 5, 10]))
    assert out.shape == (3, 4, 8, 8)
    assert out.abs().sum() > 0
    # The returned channels are the first half of the 8 the final layer emits.
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(x.new_zeros(1)) + model.y_embedder(torch.tensor([0, 5, 10]))
    for block in model.blocks:
        h = block(h, c)
    full = model.unpatchify(model.final_layer(h, c))
    assert full.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, full[:, :4])


def test_output_is_time_invariant_and_rowwise():
    """No timestep input: a row's output depends only on its own x and label, not on its batch."""
    model = tiny()
    x, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 10])
    together = model(x, y)
    alone = torch.cat([model(x[i:i + 1], y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        EqM(EqMConfig(input_size=10, patch_size=4, hidden_size=32, depth=1, num_heads=4))
    with pytest.raises(ValueError, match="unknown architecture"):
        config_for("EqM-XXL/2")
