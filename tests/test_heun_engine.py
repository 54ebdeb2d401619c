"""The Euler-Heun SDE sampler inside the running batch: same images as the offline integrator whatever
joins when, two forwards per Heun step, per-sample stopping, descent samples unaffected beside it."""
from __future__ import annotations

import pytest
import torch

from models.energy_matching.network import ARCHITECTURES, EnergyMatchingField, EnergyMatchingNet
from heun_reference import sample_heun
from models.sampler import Condition, SamplerParams, SlotBatch, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def field():
    torch.manual_seed(0)
    net = EnergyMatchingNet(ARCHITECTURES["EM-digits"]).eval().requires_grad_(False)
    with torch.no_grad():                     # the zero-initialised convolutions would hide every path
        for p in net.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0, 0.05)
    return EnergyMatchingField(net)


def heun(**kw) -> SamplerParams:
    return SamplerParams(sampler="heun-sde", **{"step_size": 0.05, "max_steps": 6, "epsilon_max": 0.05,
                                                "time_cutoff": 0.0, **kw})


def offline(field, x0, params: SamplerParams, seeds):
    return sample_heun(lambda x: field.direction(x, torch.zeros(len(x), dtype=torch.long)), x0,
                       params.heun_params(), seeds, energy=lambda x: field.energy(x, None))


def test_batch_matches_offline_integrator_and_counts_two_forwards_per_step(field):
    x0 = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    p = heun()
    want = offline(field, x0, p, [10, 11, 12, 13])
    stats = {}
    got = sample(field, x0, [Condition()] * 4, p, null_label=0, guided_channels=1, seeds=[10, 11, 12, 13], stats=stats)
    assert torch.allclose(got.latents, want.latents, atol=1e-5)
    assert got.steps == [6] * 4 and stats["nfe"] == want.nfe == 4 * 6 * 2 and stats["rows_evaluated"] == 48
    assert float(got.latents.abs().max()) <= 1.0


def test_samples_join_at_any_step_and_keep_their_own_time_and_noise(field):
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    p = heun()
    want = offline(field, x0, p, [21, 22])
    batch = SlotBatch(field, capacity=2, max_rows=2, sample_shape=SHAPE, null_label=0, guided_channels=1)
    first = batch.admit(x0[0], [(0, 1.0)], p, seed=21)
    for _ in range(3):                        # mid-step: the first sample is in its second phase
        batch.step()
    second = batch.admit(x0[1], [(0, 1.0)], p, seed=22)
    for _ in range(2 * 6):
        batch.step()
    assert torch.allclose(batch.x[first], want.latents[0], atol=1e-5)
    assert torch.allclose(batch.x[second], want.latents[1], atol=1e-5)
    assert batch.steps[[first, second]].tolist() == [6, 6] and batch.finished[[first, second]].tolist() == [1, 1]


def test_descent_and_heun_samples_share_a_batch(field):
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    gd = SamplerParams(sampler="gd", step_size=0.01, max_steps=5)
    alone = sample(field, x0[:1], [Condition()], gd, null_label=0, guided_channels=1)
    mixed = sample(field, x0, [Condition()] * 2, [gd, heun()], null_label=0, guided_channels=1, seeds=[0, 30])
    assert torch.allclose(mixed.latents[0], alone.latents[0], atol=1e-6)
    assert torch.allclose(mixed.latents[1], offline(field, x0[1:], heun(), [30]).latents[0], atol=1e-5)


def test_gradient_norm_threshold_stops_a_sample_early(field):
    x0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(4))
    norms = field.direction(x0, torch.zeros(3, dtype=torch.long)).flatten(1).norm(dim=1)
    p = heun(max_steps=20, epsilon_max=0.0, grad_norm_threshold=float(norms.max()) * 10)   # stops at once
    stats = {}
    got = sample(field, x0, [Condition()] * 3, p, null_label=0, guided_channels=1, stats=stats)
    assert got.steps == [0, 0, 0] and got.stopped_early == [True] * 3 and stats["nfe"] == 3
    assert torch.allclose(got.latents, x0.clamp(-1, 1))


def test_inpainting_holds_known_entries_through_heun_steps(field):
    x0 = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(5))
    known = torch.linspace(-0.9, 0.9, 64).reshape(SHAPE)
    keep = torch.zeros(SHAPE)
    keep[..., :4] = 1.0                                                # the left half is known
    p = heun()
    held = sample(field, x0, [Condition()], p, null_label=0, guided_channels=1, seeds=[7], holds=[(known, keep)])
    free = sample(field, x0, [Condition()], p, null_label=0, guided_channels=1, seeds=[7])
    assert torch.equal(held.latents[0][..., :4], known[..., :4])
    assert held.steps == [6] and not torch.allclose(held.latents[0][..., 4:], free.latents[0][..., 4:])


def test_energy_score_reports_v_and_the_gradient_norm(field):
    from service.scoring import score_latents
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(6))
    scores = score_latents(field, x, None, 0, None)
    y = torch.zeros(3, dtype=torch.long)
    assert [s["energy"] for s in scores] == pytest.approx(field.energy(x, y).tolist(), rel=1e-5)
    assert [s["grad_norm"] for s in scores] == pytest.approx(field.direction(x, y).flatten(1).norm(dim=1).tolist(),
                                                             rel=1e-5)
    assert all(s["in_distribution"] is None for s in scores)
