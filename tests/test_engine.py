"""Engine + runner in process on a small random-weight EqM: continuous batching, outcomes, batch invariance."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.codecs import IdentityCodec
from models.sampler import Condition, SamplerParams, noise_for_seed, partially_noised, sample
from service.engine import Engine, JobError
from service.images import encode_image
from service.jobstore import ImageSpec, JobSpec, SamplerSpec
from service.metrics import Metrics
from service.runner import ModelRunner
from service.scheduler import Scheduler
from tinymodels import TINY, random_model

CFG = TINY
NULL = CFG.null_label
SHAPE = (1, 8, 8)
SAMPLER = SamplerSpec(sampler="nag", step_size=0.05, mu=0.3, max_steps=40, grad_norm_threshold=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


def make_engine(model, capacity=8, max_rows=None, forward=None, clock=None, static=False, metrics=None):
    rows = max_rows or 3 * capacity
    runner = ModelRunner(model, codec=IdentityCodec(1, 8), null_label=NULL, guided_channels=1,
                         capacity=capacity, max_rows=rows, forward=forward)
    kwargs = {"clock": clock} if clock else {}
    return Engine(runner, Scheduler(capacity, rows, static=static), model_name="tiny",
                  metrics=metrics or Metrics(), **kwargs)


def spec(kind="generate", images=None, **kw) -> JobSpec:
    images = images if images is not None else [ImageSpec(seed=s, labels=[s % 10]) for s in range(3)]
    kw.setdefault("sampler", SAMPLER)
    kw.setdefault("cfg_scale", 1.5)
    return JobSpec(kind=kind, model="tiny", images=images, **kw)


def collect(engine: Engine, steps=None):
    images, jobs = {}, {}
    for out in engine.run_until_idle(steps):
        for img in out.images:
            images[(img.job_id, img.result.index)] = img
        for j in out.jobs:
            jobs[j.job_id] = j
    return images, jobs


def test_matches_the_offline_sampler(model):
    """The engine's per-sample result is the documented sampler's (models.sampler.sample)."""
    job = spec(images=[ImageSpec(seed=1, labels=[3]), ImageSpec(seed=2, labels=[4, 7]), ImageSpec(seed=3)])
    engine = make_engine(model)
    engine.add_job(job)
    images, jobs = collect(engine)
    assert jobs[job.id].status == "done"
    start = torch.stack([noise_for_seed(s, SHAPE) for s in (1, 2, 3)])
    conds = [Condition((3,), cfg_scale=1.5), Condition((4, 7), cfg_scale=1.5), Condition()]
    ref = sample(model, start, conds, SamplerParams(step_size=0.05, mu=0.3, max_steps=40),
                 null_label=NULL, guided_channels=1)
    got = torch.stack([images[(job.id, i)].latent for i in range(3)])
    torch.testing.assert_close(got, ref.latents, atol=1e-5, rtol=1e-5)
    assert [images[(job.id, i)].result.steps for i in range(3)] == [40, 40, 40]


def test_same_request_same_image_whatever_shares_the_batch(model):
    """Batch invariance: a job alone vs. the same job joining a busy batch mid-way, next to other kinds."""
    probe = spec("compose", images=[ImageSpec(seed=11, labels=[1, 2], weights=[0.7, 0.6]), ImageSpec(seed=12, labels=[5])])
    alone = make_engine(model)
    alone.add_job(probe)
    ref, _ = collect(alone)

    busy = make_engine(model, capacity=6)
    # Neighbours with other sampler settings (GD, another step size and cap, a threshold) in the same batch.
    busy.add_job(spec(images=[ImageSpec(seed=s, labels=[s % 10]) for s in range(5)],
                      sampler=SamplerSpec(sampler="gd", step_size=0.08, max_steps=25, grad_norm_threshold=0.5)))
    busy.add_job(spec("denoise", images=[ImageSpec(seed=7)], noise_level=0.5),
                 input_image=encode_image(np.full((8, 8, 1), 200, np.uint8)))
    for _ in range(7):
        busy.step()
    busy.add_job(JobSpec(**{**probe.__dict__}))          # same request and seeds, joins a running batch
    got, jobs = collect(busy)
    assert len(jobs) == 3 and all(j.status == "done" for j in jobs.values())
    for i in range(2):
        torch.testing.assert_close(got[(probe.id, i)].latent, ref[(probe.id, i)].latent, atol=1e-4, rtol=1e-4)
        a = np.asarray(Image.open(io.BytesIO(got[(probe.id, i)].data)), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(ref[(probe.id, i)].data)), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_a_short_job_joins_and_leaves_a_running_batch(model):
    engine = make_engine(model, capacity=6)
    long_job = spec(images=[ImageSpec(seed=s, labels=[1]) for s in range(4)], sampler=SamplerSpec(max_steps=200))
    engine.add_job(long_job)
    for _ in range(10):
        engine.step()
    short = spec(images=[ImageSpec(seed=9, labels=[2])], sampler=SamplerSpec(max_steps=5))
    engine.add_job(short)
    done_at = {}
    for n in range(1, 300):
        out = engine.step()
        done_at.update({j.job_id: n for j in out.jobs})
        if long_job.id in done_at:
            break
    assert done_at[short.id] == 5                  # admitted at once, out after its 5 steps
    assert done_at[long_job.id] == 190


def test_outcomes_converged_step_cap_and_zero_steps(model):
    engine = make_engine(model)
    conv = spec(images=[ImageSpec(seed=1, labels=[2])], sampler=SamplerSpec(max_steps=50, grad_norm_threshold=1e6))
    cap = spec(images=[ImageSpec(seed=2, labels=[2])], sampler=SamplerSpec(max_steps=7))
    zero = spec(images=[ImageSpec(seed=3, labels=[2])], sampler=SamplerSpec(max_steps=0))
    for j in (conv, cap, zero):
        engine.add_job(j)
    images, jobs = collect(engine)
    r = {j.id: images[(j.id, 0)] for j in (conv, cap, zero)}
    assert (r[conv.id].result.steps, r[conv.id].result.stopped_early) == (0, True)
    assert r[conv.id].result.grad_norm > 0
    assert (r[cap.id].result.steps, r[cap.id].result.stopped_early) == (7, False)
    assert r[zero.id].result.steps == 0 and r[zero.id].result.grad_norm is None
    torch.testing.assert_close(r[zero.id].latent, noise_for_seed(3, SHAPE))     # never moved: its start
    torch.testing.assert_close(r[conv.id].latent, noise_for_seed(1, SHAPE))
    m = engine.metrics.registry.get_sample_value
    assert m("eqm_images_total", {"model": "tiny", "task": "generate", "outcome": "converged"}) == 1
    assert m("eqm_images_total", {"model": "tiny", "task": "generate", "outcome": "step_cap"}) == 2
    assert m("eqm_jobs_total", {"model": "tiny", "outcome": "done"}) == 3
    assert m("eqm_steps_per_sample_count", {"model": "tiny", "task": "generate"}) == 3
    assert m("eqm_nfe_total") == 7 * 2 + 2          # CFG: 2 rows; the converged one was evaluated once


def test_deadline_returns_the_current_iterate_flagged(model):
    now = [1000.0]
    engine = make_engine(model, capacity=2, clock=lambda: now[0])
    late = spec(images=[ImageSpec(seed=s, labels=[1]) for s in range(3)],
                sampler=SamplerSpec(max_steps=10_000), deadline=1005.0, submitted=999.0)
    engine.add_job(late)
    for _ in range(12):
        engine.step()
    now[0] = 1005.0
    out = engine.step()
    assert [j.status for j in out.jobs] == ["done"]
    results = {img.result.index: img for img in out.images}
    assert all(r.result.deadline_exceeded and not r.result.stopped_early for r in results.values())
    assert results[0].result.steps == 12 and results[2].result.steps == 0      # 2 slots: image 2 never started
    torch.testing.assert_close(results[2].latent, noise_for_seed(2, SHAPE))
    assert out.jobs[0].latency_s == pytest.approx(6.0)
    assert engine.metrics.registry.get_sample_value(
        "eqm_images_total", {"model": "tiny", "task": "generate", "outcome": "deadline"}) == 3


def test_cancel_frees_the_slots_within_one_step(model):
    engine = make_engine(model, capacity=4)
    victim = spec(images=[ImageSpec(seed=s, labels=[1]) for s in range(6)], sampler=SamplerSpec(max_steps=10_000))
    other = spec(images=[ImageSpec(seed=9, labels=[2])], sampler=SamplerSpec(max_steps=30))
    engine.add_job(victim)
    engine.add_job(other)
    for _ in range(3):
        engine.step()
    assert engine.cancel(victim.id)
    out = engine.step()
    assert [(j.job_id, j.status, j.images) for j in out.jobs] == [(victim.id, "cancelled", [])]
    assert engine.scheduler.num_running == 1 and engine.scheduler.rows_in_use == 2
    assert not engine.cancel(victim.id)
    _, jobs = collect(engine)
    assert jobs[other.id].status == "done"
    assert engine.metrics.registry.get_sample_value(
        "eqm_images_total", {"model": "tiny", "task": "generate", "outcome": "cancelled"}) == 6


def test_denoise_starts_from_the_upload(model):
    pixels = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8, 1)
    upload = encode_image(pixels)
    engine = make_engine(model)
    keep = spec("denoise", images=[ImageSpec(seed=1)], sampler=SamplerSpec(max_steps=0))
    noised = spec("denoise", images=[ImageSpec(seed=2)], sampler=SamplerSpec(max_steps=0), noise_level=0.25)
    engine.add_job(keep, input_image=upload)
    engine.add_job(noised, input_image=upload)
    images, _ = collect(engine)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(images[(keep.id, 0)].data)))[..., None], pixels)
    base = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
    torch.testing.assert_close(images[(noised.id, 0)].latent, partially_noised(base, 0.25, noise_for_seed(2, SHAPE)))


def test_output_formats_and_grey_images(model):
    engine = make_engine(model)
    jobs = {fmt: spec(images=[ImageSpec(seed=1, labels=[1])], format=fmt, sampler=SamplerSpec(max_steps=3))
            for fmt in ("png", "jpeg", "webp")}
    for j in jobs.values():
        engine.add_job(j)
    images, _ = collect(engine)
    for fmt, j in jobs.items():
        img = images[(j.id, 0)]
        assert img.result.content_type == f"image/{fmt}"
        decoded = Image.open(io.BytesIO(img.data))
        assert decoded.format == fmt.upper() and decoded.size == (8, 8)
        assert decoded.mode == "L" or fmt == "webp"         # WebP has no grey mode: Pillow stores RGB


def test_out_of_memory_shrinks_the_forward_and_goes_on(model):
    calls = []

    def small_device(x, y):            # a device that fits at most 4 rows per forward
        calls.append(x.shape[0])
        if x.shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(x, y)

    job = spec(images=[ImageSpec(seed=s, labels=[s]) for s in range(5)])     # 5 CFG samples: 10 rows
    ref_engine = make_engine(model)
    ref_engine.add_job(job)
    ref, _ = collect(ref_engine)
    engine = make_engine(model, forward=small_device)
    engine.add_job(JobSpec(**{**job.__dict__}))
    got, jobs = collect(engine)
    assert jobs[job.id].status == "done"
    # 16-row bucket fails, then 8: the limit settles on the largest bucket that fits, and stays.
    assert engine.runner.forward_limit == 4 and engine.runner.oom_events == 2
    assert max(c for c in calls[-10:]) <= 4
    for i in range(5):
        torch.testing.assert_close(got[(job.id, i)].latent, ref[(job.id, i)].latent, atol=1e-4, rtol=1e-4)


def test_real_errors_are_not_mistaken_for_out_of_memory(model):
    def broken(x, y):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    engine = make_engine(model, forward=broken)
    engine.add_job(spec())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        engine.step()


@pytest.mark.parametrize("job, message", [
    (spec(images=[ImageSpec(seed=1, labels=[10])]), "label 10 is out of range"),
    (spec(images=[ImageSpec(seed=1, labels=list(range(8)))]), "9 model rows, at most 8"),
    (spec(format="gif"), "image format must be one of"),
    (spec(images=[]), "at least one image"),
    (spec("denoise"), "needs an input image"),
    (spec(sampler=SamplerSpec(step_size=-1.0)), "step size must be > 0"),
    (spec(images=[ImageSpec(seed=1, labels=[1, 2], weights=[1.0])]), "1 weights given for 2 labels"),
])
def test_invalid_jobs_are_refused_with_one_line(model, job, message):
    engine = make_engine(model)
    with pytest.raises(JobError, match=message):
        engine.add_job(job)
    assert not engine.has_work


def test_denoise_upload_of_the_wrong_size(model):
    engine = make_engine(model)
    with pytest.raises(JobError, match="input image is 16x16, the model works on 8x8"):
        engine.add_job(spec("denoise"), input_image=encode_image(np.zeros((16, 16, 1), np.uint8)))
    with pytest.raises(JobError, match="not a readable image"):
        engine.add_job(spec("denoise"), input_image=b"not a png")


def test_static_batching_waits_for_the_slowest_sample(model):
    engine = make_engine(model, capacity=2, static=True)
    engine.add_job(spec(images=[ImageSpec(seed=1, labels=[1])], sampler=SamplerSpec(max_steps=20)))
    engine.add_job(spec(images=[ImageSpec(seed=2, labels=[1])], sampler=SamplerSpec(max_steps=3)))
    engine.add_job(spec(images=[ImageSpec(seed=3, labels=[1])], sampler=SamplerSpec(max_steps=3)))
    outs = engine.run_until_idle()
    assert len(outs) == 23                  # 20 steps for the first batch, then 3 for the next
