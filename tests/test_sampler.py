"""Sampler math against plain reference loops: NAG-GD/GD, guidance modes, composition, stopping, starts."""
from __future__ import annotations

import copy

import pytest
import torch

from models.eqm.network import EqMConfig
from models.sampler import (Condition, SamplerParams, SlotBatch, condition_rows, noise_for_seed, partially_noised,
                            sample)
from tinymodels import random_model

CFG = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                num_classes=10)
NULL = CFG.null_label


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


def guided(model, x, rows, guided_channels):
    """The documented combination for one sample: sum_k w_k f(x, y_k) on guided channels, row 0 elsewhere."""
    outs = [model(x[None], torch.tensor([y]))[0] for y, _ in rows]
    g = sum(w * o for (_, w), o in zip(rows, outs))
    g = g.clone()
    g[guided_channels:] = outs[0][guided_channels:]
    return g


def reference_loop(model, x0, rows, p: SamplerParams, guided_channels):
    """One sample, written out plainly: look-ahead, combine, stop test, update."""
    x, m, steps, norm = x0.clone(), torch.zeros_like(x0), 0, None
    while steps < p.max_steps:
        g = guided(model, x + p.step_size * p.momentum * m, rows, guided_channels)
        norm = g.norm().item()
        if norm < p.grad_norm_threshold:
            break
        m = g
        x = x + p.step_size * g
        steps += 1
    return x, steps, norm


def test_condition_rows():
    assert condition_rows(Condition(), NULL) == [(NULL, 1.0)]
    assert condition_rows(Condition((3,)), NULL) == [(3, 1.0)]
    assert condition_rows(Condition((3,), cfg_scale=1.5), NULL) == [(3, 1.5), (NULL, pytest.approx(-0.5))]
    rows = condition_rows(Condition((3, 7), cfg_scale=2.0), NULL)
    assert rows == [(3, 1.0), (7, 1.0), (NULL, pytest.approx(-1.0))]
    assert condition_rows(Condition((3, 7)), NULL) == [(3, 0.5), (7, 0.5)]      # mean of the two fields
    assert condition_rows(Condition((3, 7), weights=(0.7, 0.6)), NULL) == [(3, 0.7), (7, 0.6), (NULL, pytest.approx(-0.3))]
    with pytest.raises(ValueError, match="2 weights given for 1 labels"):
        Condition((3,), weights=(0.5, 0.5)).label_weights()


@pytest.mark.parametrize("sampler, mu, conds, gch", [
    ("nag", 0.3, [Condition((1,), cfg_scale=1.5), Condition((4,), cfg_scale=1.5)], 3),    # official mode
    ("nag", 0.3, [Condition((1,), cfg_scale=2.0), Condition(())], 4),                      # all channels
    ("gd", 0.0, [Condition((2,)), Condition((5,))], 4),
    ("nag", 0.5, [Condition((2, 9), cfg_scale=1.5), Condition((0, 3), weights=(0.8, 0.4))], 4),   # composition
])
def test_batched_sampler_matches_reference_loop(model, sampler, mu, conds, gch):
    params = SamplerParams(sampler=sampler, step_size=0.05, mu=mu, max_steps=12)
    x0 = torch.stack([noise_for_seed(i, (4, 8, 8)) for i in range(len(conds))])
    got = sample(model, x0, conds, params, null_label=NULL, guided_channels=gch)
    for i, cond in enumerate(conds):
        x, steps, norm = reference_loop(model, x0[i], condition_rows(cond, NULL), params, gch)
        torch.testing.assert_close(got.latents[i], x, rtol=1e-5, atol=1e-5)
        assert got.steps[i] == steps == 12
        assert got.grad_norms[i] == pytest.approx(norm, rel=1e-5)
        assert not got.stopped_early[i]


def test_three_channel_mode_keeps_conditional_fourth_channel(model):
    """Official mode: channel 4 follows the conditional output only, channels 1-3 the guided one."""
    x0 = noise_for_seed(0, (4, 8, 8))[None]
    p = SamplerParams(sampler="gd", step_size=0.1, max_steps=1)
    official = sample(model, x0, [Condition((1,), cfg_scale=3.0)], p, null_label=NULL, guided_channels=3).latents[0]
    cond = model(x0, torch.tensor([1]))[0]
    uncond = model(x0, torch.tensor([NULL]))[0]
    expect = x0[0] + 0.1 * torch.cat([uncond[:3] + 3.0 * (cond[:3] - uncond[:3]), cond[3:]])
    torch.testing.assert_close(official, expect, rtol=1e-5, atol=1e-6)
    everywhere = sample(model, x0, [Condition((1,), cfg_scale=3.0)], p, null_label=NULL, guided_channels=4).latents[0]
    assert torch.allclose(official[:3], everywhere[:3], atol=1e-6)
    assert not torch.allclose(official[3], everywhere[3], atol=1e-3)


def test_adaptive_stop_freezes_sample_and_leaves_others_alone(model):
    x0 = torch.stack([noise_for_seed(i, (4, 8, 8)) for i in range(3)])
    conds = [Condition((i,)) for i in range(3)]
    base = SamplerParams(sampler="nag", step_size=0.05, mu=0.3, max_steps=15)
    free = sample(model, x0, conds, base, null_label=NULL, guided_channels=4)
    # Threshold sample 1 between its norms at steps 5 and 6 of the free run.
    _, _, norm5 = reference_loop(model, x0[1], condition_rows(conds[1], NULL), SamplerParams(**{**base.__dict__, "max_steps": 6}), 4)
    _, _, norm6 = reference_loop(model, x0[1], condition_rows(conds[1], NULL), SamplerParams(**{**base.__dict__, "max_steps": 7}), 4)
    assert norm5 != norm6
    thr = (norm5 + norm6) / 2
    # Norms shrink along the descent for this field: pick the side that stops the sample at step 6.
    params = [base, SamplerParams(**{**base.__dict__, "grad_norm_threshold": max(thr, 0)}), base]
    got = sample(model, x0, conds, params, null_label=NULL, guided_channels=4)
    ref_x, ref_steps, ref_norm = reference_loop(model, x0[1], condition_rows(conds[1], NULL), params[1], 4)
    assert got.steps[1] == ref_steps < 15 and got.stopped_early[1]
    torch.testing.assert_close(got.latents[1], ref_x, rtol=1e-5, atol=1e-5)
    assert got.grad_norms[1] == pytest.approx(ref_norm, rel=1e-5) and ref_norm < params[1].grad_norm_threshold
    for i in (0, 2):    # the others run their full course, unchanged by the early stop
        assert got.steps[i] == 15
        torch.testing.assert_close(got.latents[i], free.latents[i], rtol=1e-6, atol=1e-6)


def test_stopped_sample_never_moves_again(model):
    """Once below threshold, further steps on the batch leave that slot's state bitwise unchanged."""
    batch = SlotBatch(model, capacity=2, max_rows=2, sample_shape=(4, 8, 8), null_label=NULL, guided_channels=4)
    a = batch.admit(noise_for_seed(0, (4, 8, 8)), [(1, 1.0)], SamplerParams(step_size=0.05, grad_norm_threshold=1e9))
    b = batch.admit(noise_for_seed(1, (4, 8, 8)), [(2, 1.0)], SamplerParams(step_size=0.05, max_steps=100))
    batch.step([a, b])
    steps, _, finished = batch.snapshot([a, b])
    assert steps == [0, 1] and finished == [True, False]
    frozen = batch.x[a].clone(), batch.m[a].clone()
    for _ in range(3):
        batch.step([b])
    assert torch.equal(batch.x[a], frozen[0]) and torch.equal(batch.m[a], frozen[1])
    assert batch.snapshot([a, b])[0] == [0, 4]


def test_step_cap_and_zero_steps(model):
    x0 = torch.stack([noise_for_seed(i, (4, 8, 8)) for i in range(2)])
    params = [SamplerParams(step_size=0.05, max_steps=0), SamplerParams(step_size=0.05, max_steps=3)]
    got = sample(model, x0, [Condition((1,)), Condition((1,))], params, null_label=NULL, guided_channels=4)
    assert got.steps == [0, 3]
    assert torch.equal(got.latents[0], x0[0])


def test_partial_noise_start(model):
    clean = noise_for_seed(5, (4, 8, 8)).clamp(-1, 1)
    eps = noise_for_seed(6, (4, 8, 8))
    start = partially_noised(clean, 0.7, eps)
    torch.testing.assert_close(start, 0.7 * clean + 0.3 * eps)
    assert torch.equal(partially_noised(clean, 1.0, eps), clean)
    with pytest.raises(ValueError, match=r"noise level g must be in \[0, 1\]"):
        partially_noised(clean, 1.5, eps)
    p = SamplerParams(sampler="gd", step_size=0.05, max_steps=4)
    got = sample(model, start[None], [Condition((2,))], p, null_label=NULL, guided_channels=4)
    ref, _, _ = reference_loop(model, start, [(2, 1.0)], p, 4)
    torch.testing.assert_close(got.latents[0], ref, rtol=1e-5, atol=1e-5)


def test_seeded_noise_is_reproducible_and_distinct():
    assert torch.equal(noise_for_seed(7, (4, 8, 8)), noise_for_seed(7, (4, 8, 8)))
    assert not torch.equal(noise_for_seed(7, (4, 8, 8)), noise_for_seed(8, (4, 8, 8)))


def test_bad_params():
    with pytest.raises(ValueError, match="sampler must be one of"):
        SamplerParams(sampler="euler")
    with pytest.raises(ValueError, match="step size must be > 0"):
        SamplerParams(step_size=0)
    with pytest.raises(ValueError, match=r"mu must be in \[0, 1\)"):
        SamplerParams(mu=1.0)


def test_sampler_through_the_triton_kernel_matches_eager(model, monkeypatch):
    """The sampler's step is the fused kernel where it runs: the Triton interpreter on a CPU, the
    compiled kernel on a GPU (model and state on CUDA there; the eager reference stays on the CPU)."""
    import kernels.nag_step as ns
    on_gpu = torch.cuda.is_available()
    if not ns.HAS_TRITON:
        pytest.skip("triton is not installed")
    if on_gpu:
        assert not ns._INTERPRETING, "TRITON_INTERPRET=1 on a CUDA machine: unset it to test the compiled kernel"
    elif not ns._INTERPRETING:
        pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1 in this process")
    x0 = torch.stack([noise_for_seed(i, (4, 8, 8)) for i in range(3)])
    conds = [Condition((1,), cfg_scale=1.5), Condition((2, 5)), Condition(())]
    params = [SamplerParams(step_size=0.05, max_steps=6), SamplerParams(sampler="gd", step_size=0.05, max_steps=4),
              SamplerParams(step_size=0.05, max_steps=5, grad_norm_threshold=1e9)]
    eager = sample(model, x0, conds, params, null_label=NULL, guided_channels=3)
    calls = []
    real = ns.nag_step_triton
    monkeypatch.setattr(ns, "nag_step_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("EQM_FORCE_TRITON", "1")
    fused_model = copy.deepcopy(model).to("cuda") if on_gpu else model
    fused = sample(fused_model, x0, conds, params, null_label=NULL, guided_channels=3)
    assert calls, "the fused kernel was not used"
    tol = 1e-4 if on_gpu else 1e-5     # a GPU forward rounds differently from the CPU's
    torch.testing.assert_close(fused.latents, eager.latents, rtol=tol, atol=tol)
    assert fused.steps == eager.steps == [6, 4, 0]
