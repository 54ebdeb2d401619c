"""EqM-E (explicit energy) checkpoints: `eqm sample` descends the gradient of the energy, as the official
forward does with autograd on, and reports the official ``get_energy`` values.

The reference restates the official ``forward`` of an ``--ebm`` model: the network output ``o`` gives
``E = sum(o * x)`` (dot, mean) or ``E = -sum(o**2)/2`` (l2) per row, the update direction is
``dE/dx`` by autograd, and ``get_energy`` returns ``-E``. Guidance and the NAG-GD loop are the
official ``forward_with_cfg`` / ``sample_gd.py`` ones (see test_official_loop.py).
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from models import load_model
from models.files import CheckpointError
from models.eqm.network import EqMConfig
from models.eqm.field import EqMEnergyField, ImplicitField
from service.cli import main as cli
from tinymodels import random_model

CFG = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=1,
                num_classes=10)


def official_energy_forward(model, x0, y, ebm):
    """(direction, -E) of the official forward with autograd enabled."""
    with torch.enable_grad():
        x0 = x0.detach().requires_grad_(True)
        out = model(x0, y)
        if ebm == "l2":
            energy = -torch.sum(out ** 2, dim=(1, 2, 3)) / 2
        else:
            energy = torch.sum(out * x0, dim=(1, 2, 3))
        direction = torch.autograd.grad([energy.sum()], [x0])[0]
    return direction, -energy.detach()


def official_loop(model, z, y, ebm, steps, stepsize, mu, cfg_scale, sampler):
    n = z.shape[0]
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        z = torch.cat([z, z])
        y = torch.cat([y, torch.full((n,), CFG.num_classes)])

    def fn(x):
        if not use_cfg:
            return official_energy_forward(model, x, y, ebm)[0]
        half = x[: len(x) // 2]
        out = official_energy_forward(model, torch.cat([half, half]), y, ebm)[0]
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    xt, m = z, torch.zeros_like(z)
    for _ in range(steps):
        if sampler == "gd":
            out = fn(xt)
        else:
            out = fn(xt + stepsize * m * mu)
            m = out
        xt = xt + out * stepsize
    return xt[:n]


def _checkpoint(tmp_path, ebm, seed=0):
    model = random_model(CFG, seed=seed)
    path = tmp_path / f"{ebm}.pt"
    ns = argparse.Namespace(model="EqM-XL/2", cfg_scale=4.0, uncond=True, ebm=ebm)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": ns}, path)
    return path, model


@pytest.mark.parametrize("ebm, sampler, cfg_scale", [("dot", "nag", 1.5), ("l2", "gd", 1.0), ("dot", "gd", 1.0)])
def test_energy_checkpoint_matches_official_autograd_forward(tmp_path, ebm, sampler, cfg_scale):
    path, model = _checkpoint(tmp_path, ebm)
    labels, steps, stepsize, mu = [1, 7, 3], 10, 0.05, 0.3
    noise = torch.randn(len(labels), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "noise.npy", noise.numpy())
    code = cli(["sample", "--checkpoint", str(path), "--labels", ",".join(map(str, labels)), "--noise",
                str(tmp_path / "noise.npy"), "--steps", str(steps), "--step-size", str(stepsize), "--mu", str(mu),
                "--sampler", sampler, "--cfg-scale", str(cfg_scale), "--latents-out", str(tmp_path / "lat.npy"),
                "--energies-out", str(tmp_path / "e.npy")])
    assert code == 0
    got = torch.from_numpy(np.load(tmp_path / "lat.npy"))
    y = torch.tensor(labels)
    expect = official_loop(model, noise, y, ebm, steps, stepsize, mu, cfg_scale, sampler)
    assert (expect - noise).abs().max() > 1e-2          # the descent moved the latents
    assert (got - expect).abs().max() <= 1e-4
    # The raw head output (what a no-grad sampler descends) is a different trajectory.
    with torch.no_grad():
        raw = noise.clone()
        for _ in range(steps):
            raw = raw + stepsize * model(raw, y)
    assert (got - raw).abs().max() > 1e-3
    energies = np.load(tmp_path / "e.npy")
    assert energies.shape == (3,) and energies.dtype == np.float32
    _, cond_e = official_energy_forward(model, got, y, ebm)
    _, null_e = official_energy_forward(model, got, torch.full_like(y, CFG.num_classes), ebm)
    # The sample's energy is its rows' energies with the guidance weights: cond alone at scale 1.
    want = cfg_scale * cond_e + (1 - cfg_scale) * null_e
    np.testing.assert_allclose(energies, want.numpy(), rtol=1e-4, atol=1e-4)


def test_energy_form_from_args_metadata_and_flag(tmp_path):
    path, model = _checkpoint(tmp_path, "l2")
    loaded = load_model(path)
    assert isinstance(loaded.field, EqMEnergyField) and loaded.spec.energy_form == "l2"
    # Converted safetensors keep the form.
    out = tmp_path / "l2.safetensors"
    assert cli(["convert", str(path), str(out)]) == 0
    assert load_model(out).spec.energy_form == "l2"
    # A bare state dict records nothing: implicit unless --ebm says otherwise.
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    assert isinstance(load_model(bare).field, ImplicitField)
    assert load_model(bare, ebm="dot").spec.energy_form == "dot"
    with pytest.raises(CheckpointError, match="trained with --ebm l2, not dot"):
        load_model(path, ebm="dot")
    with pytest.raises(CheckpointError, match="unknown energy form"):
        load_model(bare, ebm="cosine")
    odd, _ = _checkpoint(tmp_path, "cosine")
    with pytest.raises(CheckpointError, match="unknown energy form 'cosine'"):
        load_model(odd)


def test_energies_out_refused_for_implicit_model(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path, "none")
    code = cli(["sample", "--checkpoint", str(path), "--n", "1", "--steps", "1",
                "--latents-out", str(tmp_path / "l.npy"), "--energies-out", str(tmp_path / "e.npy")])
    assert code != 0
    assert "has no energy" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()


def test_sum_composition_rows():
    from models.sampler import Condition, condition_rows
    assert condition_rows(Condition(labels=(3, 5), mode="sum"), 10) == [(3, 1.0), (5, 1.0)]
    assert condition_rows(Condition(labels=(3, 5), weights=(0.5, 2.0), cfg_scale=4.0, mode="sum"), 10) == \
        [(3, 0.5), (5, 2.0)]
    guided = condition_rows(Condition(labels=(3, 5), cfg_scale=2.0), 10)
    assert guided == [(3, 1.0), (5, 1.0), (10, -1.0)]
    with pytest.raises(ValueError, match="composition mode"):
        Condition(labels=(3,), mode="product")


def test_cli_inpaint_holds_known_pixels(tmp_path):
    from PIL import Image
    path, _ = _checkpoint(tmp_path, "dot")
    bare = tmp_path / "pixels.pt"
    pixel_cfg = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2,
                          num_heads=1, num_classes=10, learn_sigma=False)
    torch.save(random_model(pixel_cfg).state_dict(), bare)
    image = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    Image.fromarray(image, "L").save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    code = cli(["sample", "--checkpoint", str(bare), "--ebm", "dot", "--labels", "1,2", "--steps", "5",
                "--step-size", "0.05", "--inpaint", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                "--images-out", str(tmp_path / "out.npy"), "--energies-out", str(tmp_path / "e.npy")])
    assert code == 0
    out = np.load(tmp_path / "out.npy")[..., 0]
    assert (out[:, :4] == image[:4]).all() and not (out[:, 4:] == image[4:]).all()
    assert np.isfinite(np.load(tmp_path / "e.npy")).all()
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(tmp_path / "small.png")
    assert cli(["sample", "--checkpoint", str(bare), "--n", "1", "--steps", "1", "--inpaint", str(tmp_path / "in.png"),
                "--mask", str(tmp_path / "small.png"), "--images-out", str(tmp_path / "x.npy")]) != 0
