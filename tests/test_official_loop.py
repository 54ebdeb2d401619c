"""`eqm sample --latents-out` reproduces the official sample_gd.py loop (same checkpoint, same noise).

The reference below restates the official loop: the batch is doubled to ``[x; x]`` with labels
``[y; null]``, guidance ``u + s*(c - u)`` is applied to the first 3 latent channels while channel 4 keeps
each half's own output, the NAG look-ahead is ``x + eta*mu*m`` with ``m = out``, and
``--num-sampling-steps N`` runs N-1 updates; the first half is the result.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from models.eqm.network import EqMConfig
from service.cli import main as cli
from tinymodels import random_model

# Custom shape: an official .pt has no head count, and the loader takes 64-wide heads (as S/B/L use).
CFG = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=1,
                num_classes=10)


def official_forward_with_cfg(model, x, y, cfg_scale):
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), y)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def official_loop(model, z, y, sampler, num_sampling_steps, stepsize, mu, cfg_scale):
    n = z.shape[0]
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        z = torch.cat([z, z])
        y = torch.cat([y, torch.full((n,), CFG.num_classes)])
        fn = lambda x: official_forward_with_cfg(model, x, y, cfg_scale)   # noqa: E731
    else:
        fn = lambda x: model(x, y)   # noqa: E731
    xt, m = z, torch.zeros_like(z)
    for _ in range(num_sampling_steps - 1):
        if sampler == "gd":
            out = fn(xt)
        else:
            out = fn(xt + stepsize * m * mu)
            m = out
        xt = xt + out * stepsize
    return xt[:n] if use_cfg else xt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = random_model(CFG)
    path = tmp_path_factory.mktemp("ck") / "0001000.pt"
    ns = argparse.Namespace(model="EqM-XL/2", cfg_scale=4.0, uncond=True)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": ns}, path)
    return path, model.eval()


@pytest.mark.parametrize("sampler, steps, cfg_scale, extra", [
    ("ngd", 40, 1.5, []),                                       # NAG-GD, CFG 1.5, 3-channel mode (the default)
    ("gd", 30, 1.0, ["--sampler", "gd", "--cfg-scale", "1"]),   # GD, no guidance
])
def test_cli_reproduces_official_loop(checkpoint, tmp_path, sampler, steps, cfg_scale, extra):
    path, model = checkpoint
    stepsize, mu = 0.05, 0.3     # larger than the paper's 0.0017 so 40 steps move the latents far
    labels = [1, 7, 3]
    noise = torch.randn(len(labels), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "noise.npy", noise.numpy())
    code = cli(["sample", "--checkpoint", str(path), "--labels", ",".join(map(str, labels)),
                "--noise", str(tmp_path / "noise.npy"), "--steps", str(steps - 1), "--step-size", str(stepsize),
                "--mu", str(mu), "--latents-out", str(tmp_path / "lat.npy"), *extra])
    assert code == 0
    got = np.load(tmp_path / "lat.npy")
    assert got.dtype == np.float32 and got.shape == (3, 4, 8, 8)
    with torch.no_grad():
        expect = official_loop(model, noise, torch.tensor(labels), sampler, steps, stepsize, mu, cfg_scale)
    assert np.abs(got - expect.numpy()).max() < 1e-4
    assert np.abs(got - noise.numpy()).max() > 0.1     # the descent really moved


def test_cli_rejects_bad_input(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = str(tmp_path / "lat.npy")
    assert cli(["sample", "--checkpoint", str(path), "--labels", "1,12", "--latents-out", out]) == 2
    assert "12 is out of range" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 8, 8), np.float32))
    assert cli(["sample", "--checkpoint", str(path), "--labels", "1", "--noise", str(tmp_path / "bad.npy"),
                "--latents-out", out]) == 2
    assert "--noise has shape (2, 4, 8, 8), expected (1, 4, 8, 8)" in capsys.readouterr().err
    assert cli(["sample", "--checkpoint", str(path), "--labels", "x", "--latents-out", out]) == 2
    assert cli(["sample", "--checkpoint", str(path), "--labels", "1", "--out", str(tmp_path / "png")]) == 2
    assert "VAE" in capsys.readouterr().err
    assert not (tmp_path / "lat.npy").exists()
