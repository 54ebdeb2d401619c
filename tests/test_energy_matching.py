"""Energy Matching: the network, official checkpoints, conversion and the CLI's Euler-Heun sampler,
against an independent restatement of the official code (tests/em_reference.py), at random weights."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import em_reference as ref
from heun_reference import sample_heun
from models.energy_matching.checkpoint import load_energy_matching
from models.energy_matching.network import EnergyMatchingField
from models.eqm.checkpoint import CheckpointError
from models.heun_sde import HeunSDEParams, epsilon, step_noise
from service.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SMALL_FLAGS = dict(num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="4",
                   num_heads=4, num_head_channels=32, embed_dim=64, transformer_nheads=4, transformer_nlayers=2,
                   output_scale=10.0, patch_size=2, image_size=8, in_channels=1)
SMALL_OVERRIDES = ["num_res_blocks=1", "channel_mult=1,2", "attention_resolutions=4", "num_head_channels=32",
                   "output_scale=10"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def official_file(path: Path, flags=ref.OFFICIAL_FLAGS) -> tuple[dict, dict]:
    """An official training checkpoint: ema and raw weights differ, plus scheduler, optimiser, step."""
    ema, net = ref.random_official_state(flags, seed=0), ref.random_official_state(flags, seed=1)
    torch.save({"net_model": net, "ema_model": ema, "sched": {"last_epoch": 7}, "optim": {"state": {}, "param_groups": []},
                "step": 7}, path)
    return ema, net


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("em") / "cifar10_main_training.pt"
    ema, net = official_file(path)
    return path, ema, net


def test_official_checkpoint_potential_and_velocity_match_reference(official):
    path, ema, net = official
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    loaded = load_energy_matching(path)                       # official default flags, ema by default, strict
    assert rel(loaded.network.potential(x), ref.potential(ema, x)) <= 1e-4
    velocity = EnergyMatchingField(loaded.network).direction(x, torch.zeros(len(x), dtype=torch.long))   # -dV/dx
    assert rel(velocity, ref.velocity(ema, x)) <= 1e-4
    raw = load_energy_matching(path, weights="model")
    assert rel(raw.network.potential(x), ref.potential(net, x)) <= 1e-4
    assert rel(raw.network.potential(x), ref.potential(ema, x)) > 1e-2     # really the other weights


@pytest.mark.slow
def test_cli_sample_matches_official_heun_and_reports_energies(official, tmp_path):
    path, ema, _ = official
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "z.npy", z.numpy())
    cmd = [sys.executable, "-m", "service.cli", "sample", "--checkpoint", str(path), "--noise", str(tmp_path / "z.npy"),
           "--steps", "4", "--dt", "0.01", "--epsilon-max", "0", "--device", "cpu", "--dtype", "float32",
           "--latents-out", str(tmp_path / "x.npy"), "--energies-out", str(tmp_path / "e.npy")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    # 4 Heun steps (t = 0.04) check the same path as the README's 20 at a fifth of the cost of this big network.
    want = ref.official_heun(lambda y: ref.velocity(ema, y), z, 0.04, 0.01, lambda t: 0.0, None)
    got = torch.from_numpy(np.load(tmp_path / "x.npy"))
    assert rel(got, want) <= 1e-4
    energies = np.load(tmp_path / "e.npy")
    assert energies.shape == (2,) and energies.dtype == np.float32
    assert rel(torch.from_numpy(energies), ref.potential(ema, want)) <= 1e-4


def test_convert_writes_architecture_metadata_and_loads_without_flags(tmp_path):
    official_file(tmp_path / "small.pt", SMALL_FLAGS)
    argv = ["convert", str(tmp_path / "small.pt"), str(tmp_path / "small.safetensors")]
    for item in SMALL_OVERRIDES:
        argv += ["--model-flag", item]
    assert main(argv) == 0
    with safe_open(str(tmp_path / "small.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    config = json.loads(meta["config"])
    assert meta["family"] == "energy-matching" and config["channel_mult"] == [1, 2] and config["output_scale"] == 10.0
    a = load_energy_matching(tmp_path / "small.pt", overrides=dict(i.split("=") for i in SMALL_OVERRIDES))
    b = load_energy_matching(tmp_path / "small.safetensors")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(a.network.potential(x), b.network.potential(x))
    ema = ref.random_official_state(SMALL_FLAGS, seed=0)
    assert rel(b.network.potential(x), ref.potential(ema, x, SMALL_FLAGS)) <= 1e-4


def test_wrong_flags_are_one_line_errors(tmp_path, capsys):
    official_file(tmp_path / "small.pt", SMALL_FLAGS)
    with pytest.raises(CheckpointError, match="does not match|has shape"):
        load_energy_matching(tmp_path / "small.pt")                  # official defaults do not fit this file
    code = main(["convert", str(tmp_path / "small.pt"), str(tmp_path / "o.safetensors"), "--model-flag", "nope=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown architecture flag 'nope'" in err and "\n" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_dt_is_not_an_abbreviation_of_dtype():
    args = build_parser().parse_args(["sample", "--checkpoint", "x", "--dt", "0.02"])
    assert args.dt == 0.02 and args.dtype == "float32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--checkpoint", "x", "--dtyp", "float32"])


def test_epsilon_schedule_matches_official_piecewise_form():
    assert epsilon(0.5, 0.01, 1.0) == 0.0 and epsilon(1.0, 0.01, 1.0) == 0.01 and epsilon(3.0, 0.01, 1.0) == 0.01
    assert epsilon(0.2, 0.01, 0.4) == 0.0 and math.isclose(epsilon(0.7, 0.01, 0.4), 0.005)


def test_noise_increments_have_the_sde_statistics():
    """Zero drift: x_final - x0 = sum_k (g(t_k) + g(t_k+1))/2 * sqrt(dt) z_k, per sample and element."""
    p = HeunSDEParams(dt=0.02, max_steps=60, epsilon_max=0.002, time_cutoff=0.5)
    n, shape = 64, (1, 8, 8)
    result = sample_heun(lambda x: torch.zeros_like(x), torch.zeros(n, *shape), p, list(range(n)))
    inc = result.latents.flatten()
    var = sum(((math.sqrt(2 * epsilon(k * p.dt, p.epsilon_max, p.time_cutoff)) +
                math.sqrt(2 * epsilon((k + 1) * p.dt, p.epsilon_max, p.time_cutoff))) / 2) ** 2 * p.dt
              for k in range(p.max_steps))
    m = inc.numel()
    assert abs(float(inc.mean())) < 4 * math.sqrt(var / m)
    # Sample variance of m normals: relative standard error sqrt(2/m).
    assert abs(float(inc.var()) / var - 1) < 4 * math.sqrt(2 / m)
    assert float(inc.abs().max()) < 1           # the clamp did not touch the statistics
    assert result.nfe == 2 * n * p.max_steps


def test_same_seed_same_trajectory_whatever_shares_the_batch():
    p = HeunSDEParams(dt=0.05, max_steps=30, epsilon_max=0.05, time_cutoff=0.0)
    field = lambda x: -x                                              # a quadratic potential
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    together = sample_heun(field, x0, p, [11, 12, 13]).latents
    alone = sample_heun(field, x0[1:2], p, [12]).latents
    assert torch.allclose(together[1], alone[0], atol=1e-6)
    assert not torch.allclose(step_noise(11, 0, (4,)), step_noise(12, 0, (4,)))
    assert not torch.allclose(step_noise(11, 0, (4,)), step_noise(11, 1, (4,)))


def test_per_sample_stopping_counts_two_evaluations_per_step():
    field = lambda x: -x
    x0 = torch.ones(2, 1, 2, 2)
    x0[1] *= 0.1                                                      # starts closer: stops sooner
    p = HeunSDEParams(dt=0.1, max_steps=100, epsilon_max=0.0, grad_norm_threshold=0.05)
    r = sample_heun(field, x0, p, [0, 1])
    assert r.stopped_early == [True, True] and r.steps[1] < r.steps[0] < 100
    # Each sample: 2 per Heun step, plus the evaluation that found the norm below the threshold.
    assert r.nfe == sum(2 * k + 1 for k in r.steps)
    assert all(norm < 0.05 for norm in r.grad_norms)
