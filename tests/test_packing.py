"""Packed rows: finished samples leave the forward at once, without changing anyone's trajectory."""
from __future__ import annotations

import pytest
import torch

from models.eqm.network import EqM
from models.sampler import (Condition, SamplerParams, SlotBatch, condition_rows, default_row_buckets,
                            noise_for_seed, sample)
from models.codecs import IdentityCodec
from service.engine import Engine
from service.jobstore import ImageSpec, JobSpec, SamplerSpec
from service.metrics import Metrics
from service.runner import ModelRunner, configure_device_math, model_dtype
from service.scheduler import Scheduler
from tinymodels import TINY, random_model

CFG = TINY
NULL = CFG.null_label
SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


# (condition, params): 1, 2 and 3 rows per sample, caps and a threshold that end them at different steps.
SAMPLES = [
    (Condition((1,), cfg_scale=1.5), SamplerParams(step_size=0.05, mu=0.3, max_steps=3)),
    (Condition((2, 7), cfg_scale=1.5), SamplerParams(step_size=0.05, mu=0.3, max_steps=11)),
    (Condition(()), SamplerParams(sampler="gd", step_size=0.08, max_steps=6)),
    (Condition((4,), cfg_scale=2.0), SamplerParams(step_size=0.05, mu=0.5, max_steps=14)),
    (Condition((3, 8)), SamplerParams(step_size=0.05, mu=0.3, max_steps=9)),
    (Condition((5,), cfg_scale=1.5), SamplerParams(step_size=0.05, mu=0.3, max_steps=30, grad_norm_threshold=1e9)),
    (Condition((9,), cfg_scale=1.5), SamplerParams(step_size=0.03, mu=0.3, max_steps=7)),
]
LATE = {6: 4}      # sample 6 joins the batch after step 4, into rows freed by then


def solo_trajectory(model, i):
    """Sample i alone in a batch of one: the iterate after every step, and its step count."""
    cond, params = SAMPLES[i]
    rows = condition_rows(cond, NULL)
    batch = SlotBatch(model, capacity=1, max_rows=len(rows), sample_shape=SHAPE, null_label=NULL, guided_channels=1)
    slot = batch.admit(noise_for_seed(i, SHAPE), rows, params)
    xs = []
    while True:
        batch.step()
        xs.append(batch.x[slot].clone())
        _, steps, _, finished = batch.post_status().result()
        if finished[0]:
            return xs, steps[0]


def test_compaction_keeps_every_trajectory_equal_to_running_alone(model):
    forward_sizes = []

    def forward(x, y):
        forward_sizes.append(x.shape[0])
        return model(x, y)

    batch = SlotBatch(model, capacity=8, max_rows=16, sample_shape=SHAPE, null_label=NULL, guided_channels=1,
                      forward=forward)
    owner, traj, steps_of, moved = {}, {i: [] for i in range(len(SAMPLES))}, {}, 0

    def admit(i):
        cond, params = SAMPLES[i]
        owner[batch.admit(noise_for_seed(i, SHAPE), condition_rows(cond, NULL), params)] = i

    for i in range(len(SAMPLES)):
        if i not in LATE:
            admit(i)
    step = 0
    while batch.order:
        before = {s: list(r) for s, r in batch.slot_rows.items()}
        batch.step()
        step += 1
        # The forward ran on the smallest bucket holding the rows in use, never more.
        assert forward_sizes[-1] == batch.bucket_for(sum(len(r) for r in before.values()))
        for s in batch.order:
            traj[owner[s]].append(batch.x[s].clone())
        slots, steps, _, finished = batch.post_status().result()
        done = [s for s, f in zip(slots, finished) if f]
        for s, k in zip(slots, steps):
            steps_of[owner[s]] = k
        batch.release_many(done)
        for s in done:
            owner.pop(s)
        # Packed: the rows in use are exactly [0, n), each listed once.
        in_use = sorted(r for rows in batch.slot_rows.values() for r in rows)
        assert in_use == list(range(batch.n_rows))
        moved += sum(before[s] != batch.slot_rows[s] for s in batch.slot_rows if s in before)
        for i, at in LATE.items():
            if step == at:
                admit(i)
    assert moved >= 2, "the schedule should have moved rows of running samples"
    assert forward_sizes[0] > forward_sizes[-1]
    for i in range(len(SAMPLES)):
        ref, ref_steps = solo_trajectory(model, i)
        assert steps_of[i] == ref_steps
        assert len(traj[i]) == len(ref)
        diff = max(float((a - b).abs().max()) for a, b in zip(traj[i], ref))
        assert diff <= 1e-5, f"sample {i}: trajectory differs by {diff:.2e}"


def test_offline_sample_drops_finished_rows(model):
    """sample(): rows evaluated follow the live rows, and each result is the sample's own."""
    conds = [c for c, _ in SAMPLES[:5]]
    params = [p for _, p in SAMPLES[:5]]
    start = torch.stack([noise_for_seed(i, SHAPE) for i in range(5)])
    stats = {}
    got = sample(model, start, conds, params, null_label=NULL, guided_channels=1, stats=stats)
    assert got.steps == [3, 11, 6, 14, 9]
    nfe = sum(len(condition_rows(c, NULL)) * p.max_steps for c, p in zip(conds, params))
    assert stats["nfe"] == nfe
    # Everyone in one batch until the slowest stops would evaluate 10 rows x 14 steps = 140.
    assert stats["rows_evaluated"] <= 1.25 * nfe < 140
    for i in range(5):
        alone = sample(model, start[i:i + 1], conds[i:i + 1], params[i], null_label=NULL, guided_channels=1)
        assert (got.latents[i] - alone.latents[0]).abs().max() <= 1e-5
        assert got.steps[i] == alone.steps[0]


def test_offline_sample_with_a_lagged_status_read_is_identical(model):
    conds = [c for c, _ in SAMPLES]
    params = [p for _, p in SAMPLES]
    start = torch.stack([noise_for_seed(i, SHAPE) for i in range(len(SAMPLES))])
    now_stats, lag_stats = {}, {}
    now = sample(model, start, conds, params, null_label=NULL, guided_channels=1, stats=now_stats, status_lag=0)
    lag = sample(model, start, conds, params, null_label=NULL, guided_channels=1, stats=lag_stats, status_lag=1)
    assert now.steps == lag.steps and now.stopped_early == lag.stopped_early
    assert now.grad_norms == pytest.approx(lag.grad_norms, rel=1e-6)
    assert float((now.latents - lag.latents).abs().max()) <= 1e-5
    assert now_stats["nfe"] == lag_stats["nfe"] and lag_stats["rows_evaluated"] > now_stats["rows_evaluated"]


def test_unpacked_mode_keeps_rows_in_place(model):
    """The former layout (benchmark baseline): holes stay, the forward covers the highest row in use."""
    batch = SlotBatch(model, capacity=4, max_rows=8, sample_shape=SHAPE, null_label=NULL, guided_channels=1,
                      packed=False, row_buckets=[1, 2, 4, 8])
    p_short, p_long = SamplerParams(step_size=0.05, max_steps=1), SamplerParams(step_size=0.05, max_steps=5)
    a = batch.admit(noise_for_seed(0, SHAPE), [(1, 1.0), (NULL, 0.0)], p_short)
    b = batch.admit(noise_for_seed(1, SHAPE), [(2, 1.0)], p_long)
    assert batch.step() == 4
    batch.release(a)
    assert batch.slot_rows[b] == [2] and batch.step() == 4
    packed = SlotBatch(model, capacity=4, max_rows=8, sample_shape=SHAPE, null_label=NULL, guided_channels=1)
    a = packed.admit(noise_for_seed(0, SHAPE), [(1, 1.0), (NULL, 0.0)], p_short)
    b = packed.admit(noise_for_seed(1, SHAPE), [(2, 1.0)], p_long)
    packed.step()
    packed.release(a)
    assert packed.slot_rows[b] == [0] and packed.step() == 1


def test_default_buckets_are_fine_above_eight():
    assert default_row_buckets(96) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96]
    assert default_row_buckets(6) == [1, 2, 4, 6]
    b = default_row_buckets(512)
    assert b[-1] == 512 and all((hi - lo) / hi <= 0.5 for lo, hi in zip(b, b[1:]))
    assert all((hi - lo) / hi <= 1 / 8 for lo, hi in zip(b, b[1:]) if lo >= 64)
    assert len(default_row_buckets(256)) == 27


def engine_for(model, status_lag, capacity=6, **runner_options):
    runner = ModelRunner(model, codec=IdentityCodec(1, 8), null_label=NULL, guided_channels=1,
                         capacity=capacity, max_rows=3 * capacity, status_lag=status_lag, **runner_options)
    return Engine(runner, Scheduler(capacity, 3 * capacity), model_name="tiny", metrics=Metrics())


def mixed_jobs():
    jobs = [
        JobSpec(kind="generate", model="tiny", cfg_scale=1.5,
                images=[ImageSpec(seed=s, labels=[s % 10]) for s in range(4)],
                sampler=SamplerSpec(step_size=0.05, mu=0.3, max_steps=12, grad_norm_threshold=0.0)),
        JobSpec(kind="compose", model="tiny", cfg_scale=1.0,
                images=[ImageSpec(seed=10 + s, labels=[1, 7]) for s in range(3)],
                sampler=SamplerSpec(step_size=0.05, mu=0.3, max_steps=20, grad_norm_threshold=1e9)),
        JobSpec(kind="generate", model="tiny", cfg_scale=1.5, images=[ImageSpec(seed=20 + s, labels=[3]) for s in range(5)],
                sampler=SamplerSpec(sampler="gd", step_size=0.08, max_steps=5)),
    ]
    return jobs


def run_engine(engine, jobs):
    for j in jobs:
        engine.add_job(JobSpec(**j.__dict__))
    images, n_steps = {}, 0
    for out in engine.run_until_idle(500):
        n_steps += 1
        for img in out.images:
            images[(img.job_id, img.result.index)] = img
    return images, n_steps


def test_lagged_status_read_gives_identical_results(model):
    """A status read that lags one step (the CUDA default) changes no image, step count or norm."""
    jobs = mixed_jobs()
    now, now_steps = run_engine(engine_for(model, 0), jobs)
    lag, lag_steps = run_engine(engine_for(model, 1), jobs)
    assert lag_steps > now_steps            # the lag was real: finishes were seen a step later
    assert now.keys() == lag.keys() and len(now) == 12
    for key, img in now.items():
        other = lag[key]
        assert (img.result.steps, img.result.stopped_early) == (other.result.steps, other.result.stopped_early)
        assert img.result.grad_norm == pytest.approx(other.result.grad_norm, rel=1e-6)
        assert float((img.latent - other.latent).abs().max()) <= 1e-5
        assert img.data == other.data


def test_engine_reports_bucket_rows_close_to_nfe(model):
    engine = engine_for(model, 0, capacity=8)
    for j in mixed_jobs():
        engine.add_job(j)
    outs = engine.run_until_idle(500)
    nfe = sum(o.rows for o in outs)
    evaluated = sum(o.bucket_rows for o in outs)
    assert all(o.bucket_rows == engine.runner.batch.bucket_for(o.rows) for o in outs if o.rows)
    assert nfe <= evaluated <= 1.3 * nfe


def test_model_dtype_defaults_to_bfloat16_on_cuda():
    """No GPU needed: the choice depends on the device named, not on the one present."""
    assert model_dtype("auto", "cuda") == torch.bfloat16
    assert model_dtype("auto", "cuda:1") == torch.bfloat16
    assert model_dtype("auto", "cpu") == torch.float32
    assert model_dtype("float32", "cuda") == torch.float32
    assert model_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="model dtype must be auto or one of"):
        model_dtype("float8", "cuda")


def test_worker_and_settings_default_to_auto_dtype():
    from service.settings import Settings
    from service.worker import WorkerConfig
    assert Settings().dtype == "auto"
    assert WorkerConfig(redis_url="redis://x").dtype == "auto"
    assert WorkerConfig.from_settings(Settings(redis_url="redis://x")).dtype == "auto"


def test_float32_on_cuda_turns_tf32_on():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        configure_device_math("cpu", torch.float32)
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_device_math("cuda", torch.bfloat16)
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_device_math("cuda:0", torch.float32)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_compile_modes():
    from service.runner import compiled_forward
    m = torch.nn.Linear(2, 2)
    assert compiled_forward(m, "off", 10) is m
    with pytest.raises(ValueError, match="compile mode must be one of off, compile, cudagraphs"):
        compiled_forward(m, "fast", 10)


@pytest.mark.slow
def test_compiled_forward_gives_the_eager_results(model):
    """``EQM_COMPILE=compile`` on a CPU worker: the engine through torch.compile (one bucket, so one graph
    to build) takes the same steps and reaches the same latents as the eager forward."""
    jobs = mixed_jobs()
    eager, eager_steps = run_engine(engine_for(model, 0, row_buckets=(18,)), jobs)
    compiled_engine = engine_for(model, 0, row_buckets=(18,), compile_mode="compile")
    assert compiled_engine.runner._model_forward is not model          # the forward goes through torch.compile
    compiled_engine.runner.warmup()
    got, got_steps = run_engine(compiled_engine, jobs)
    assert got_steps == eager_steps and got.keys() == eager.keys()
    for key, img in eager.items():
        assert got[key].result.steps == img.result.steps
        assert float((img.latent - got[key].latent).abs().max()) <= 1e-4


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compile_mode", ["off", "cudagraphs"])
def test_cuda_engine_defaults_match_the_cpu(model, compile_mode):
    """On CUDA: bf16 by default, the lagged status read, optional CUDA graphs; same steps, close latents."""
    jobs = mixed_jobs()
    cpu = run_engine(engine_for(model, 0), jobs)[0]
    gpu_model = EqM(CFG).to("cuda", model_dtype("auto", "cuda")).eval().requires_grad_(False)
    gpu_model.load_state_dict(model.state_dict())
    runner = ModelRunner(gpu_model, codec=IdentityCodec(1, 8), null_label=NULL, guided_channels=1, capacity=6,
                         max_rows=18, compile_mode=compile_mode)
    assert runner.status_lag == 1 and runner.dtype == torch.bfloat16
    runner.warmup()
    engine = Engine(runner, Scheduler(6, 18), model_name="tiny", metrics=Metrics())
    got = run_engine(engine, jobs)[0]
    assert got.keys() == cpu.keys()
    for key, img in cpu.items():
        assert float((img.latent - got[key].latent).abs().max()) < 0.1      # bf16 model, fp32 iterate


def test_flush_emits_what_left_but_was_not_out_yet(model):
    """With the emission lag, an image retired in one step comes out in the next; ``flush`` (a worker
    stopping) hands it out at once, and it is not emitted again when stepping goes on."""
    jobs = [JobSpec(kind="generate", model="tiny", cfg_scale=1.5, images=[ImageSpec(seed=seed, labels=[seed])],
                    sampler=SamplerSpec(step_size=0.05, mu=0.3, max_steps=cap)) for seed, cap in ((1, 3), (2, 8))]
    probe = engine_for(model, 1)
    for job in jobs:
        probe.add_job(JobSpec(**job.__dict__))
    steps, first = 0, []
    while not first:
        steps += 1
        first = probe.step().images
    engine = engine_for(model, 1)
    for job in jobs:
        engine.add_job(JobSpec(**job.__dict__))
    for _ in range(steps - 1):
        assert not engine.step().images
    flushed = engine.flush()
    assert [(i.job_id, i.result.steps) for i in flushed.images] == [(jobs[0].id, 3)] == \
        [(i.job_id, i.result.steps) for i in first]
    assert torch.equal(flushed.images[0].latent, first[0].latent) and flushed.images[0].data == first[0].data
    assert [j.job_id for j in flushed.jobs] == [jobs[0].id] and engine.has_work
    later = [out for out in engine.run_until_idle(100)]
    assert [i.job_id for out in later for i in out.images] == [jobs[1].id] and not engine.has_work
