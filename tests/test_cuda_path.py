"""What can be checked on a CPU of the CUDA-only path: one device per worker process (by structure),
the staging ring, the out-of-memory fallback under CUDA-graph output reuse, warm-up, and that the GPU
tests can be collected on a machine without redis-py."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.codecs import IdentityCodec
from models.sampler import StagingRing
from service.runner import WARMUP_CALLS, ModelRunner
from tinymodels import TINY, random_model

ROOT = Path(__file__).resolve().parents[1]
# Calls that act on the *current* CUDA device (or allocate under its context) unless given one.
DEVICE_BOUND = re.compile(r"torch\.cuda\.(Event|Stream|empty_cache|synchronize|set_device|stream)\b|"
                          r"pin_memory\s*[=(]|\.pin_memory\(")


def _sources(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_device_bound_cuda_calls_live_in_models_device_only():
    offenders = []
    for path in _sources("models", "service", "kernels"):
        if path == ROOT / "models" / "device.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if DEVICE_BOUND.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "device-bound CUDA calls outside models/device.py:\n" + "\n".join(offenders)


def test_every_helper_in_models_device_is_given_the_device():
    tree = ast.parse((ROOT / "models" / "device.py").read_text(encoding="utf-8"))
    funcs = [f for f in tree.body if isinstance(f, ast.FunctionDef)]
    assert {"claim_device", "record_event", "pinned_empty", "pinned_copy", "empty_cache", "synchronize"} <= \
        {f.name for f in funcs}
    for f in funcs:
        assert "device" in [a.arg for a in f.args.args], f"models.device.{f.name} does not take the device"
        body = ast.unparse(f)
        # Whatever it creates, it creates under the device it was given, never the current one.
        if re.search(r"Event\(|pin_memory|empty_cache", body):
            assert "torch.cuda.device(" in body, f"models.device.{f.name} does not enter the device's context"


def _call_order(func: ast.FunctionDef) -> list[str]:
    calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)]
    calls.sort(key=lambda c: (c.lineno, c.col_offset))
    return [c.func.id if isinstance(c.func, ast.Name) else getattr(c.func, "attr", "") for c in calls]


def test_worker_claims_its_device_before_any_other_cuda_work():
    tree = ast.parse((ROOT / "service" / "worker" / "loop.py").read_text(encoding="utf-8"))
    build = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "build_engine")
    order = _call_order(build)
    assert "claim_device" in order, "build_engine does not claim its device"
    first = order.index("claim_device")
    for later in ("configure_device_math", "load_model", "make_codec", "from_loaded", "warmup"):
        assert order.index(later) > first, f"build_engine calls {later} before claim_device"
    runner = ast.parse((ROOT / "service" / "runner.py").read_text(encoding="utf-8"))
    init = next(f for f in ast.walk(runner) if isinstance(f, ast.FunctionDef) and f.name == "__init__"
                and "model" in [a.arg for a in f.args.args])
    assert _call_order(init).index("claim_device") < _call_order(init).index("SlotBatch")


def test_staging_ring_alternates_buffers():
    made = []
    ring = StagingRing(lambda key: made.append(key) or f"buf{len(made)}")
    used = []
    for _ in range(5):
        entry = ring.take(("i32", (4,)))
        used.append(entry[0])
        entry[1] = "event"
        ring.put(("i32", (4,)), entry)
    # A, B, A, B, A: a buffer is reused only two uploads later (never waits on the copy just queued).
    assert used == ["buf1", "buf2", "buf1", "buf2", "buf1"]
    assert len(made) == 2


class GraphLikeForward:
    """A forward with CUDA-graph output semantics: each call returns the same static buffer of its
    shape, overwritten by the next call; more than ``fits`` rows raise an out-of-memory error."""

    def __init__(self, model, fits: int):
        self.model, self.fits, self.buffers, self.calls = model, fits, {}, []

    def __call__(self, x, y):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        out = self.model(x, y)
        buf = self.buffers.setdefault(tuple(out.shape), torch.empty_like(out))
        buf.copy_(out)
        return buf


@pytest.fixture(scope="module")
def model():
    return random_model(TINY)


def make_runner(model, forward, **kw):
    return ModelRunner(model, codec=IdentityCodec(1, 8), null_label=TINY.null_label, guided_channels=1,
                       capacity=8, max_rows=16, forward=forward, **kw)


@torch.no_grad()
def test_out_of_memory_fallback_keeps_each_chunk_when_the_forward_reuses_its_output(model):
    forward = GraphLikeForward(model, fits=4)
    runner = make_runner(model, forward)
    x = torch.randn(12, 1, 8, 8)
    y = torch.arange(12) % 10
    got = runner._forward(x, y)
    assert runner.forward_limit == 4 and runner.oom_events == 2      # buckets 1, 2, 4, 8, 16: 12 -> 8 -> 4
    assert forward.calls == [12, 8, 4, 4, 4]
    torch.testing.assert_close(got, model(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["off", "compile", "cudagraphs"])
def test_warmup_calls_each_bucket_until_it_replays(model, mode):
    forward = GraphLikeForward(model, fits=16)
    runner = make_runner(model, forward, compile_mode=mode)
    before = runner.batch.x.clone()
    seconds = runner.warmup()
    buckets = runner.batch.row_buckets
    assert forward.calls == [b for b in buckets for _ in range(WARMUP_CALLS[mode])]
    assert seconds == runner.warmup_seconds and seconds > 0
    assert torch.equal(runner.batch.x, before) and not runner.batch.order


@pytest.mark.slow
def test_gpu_tests_collect_without_redis_py():
    """A GPU box may have no redis-py: the kernel and sampler tests must still be collected."""
    code = ("import sys; sys.modules['redis'] = None; import pytest; "
            "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', "
            "'tests/test_nag_step.py', 'tests/test_sampler.py']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "test_cuda_matches_reference" in proc.stdout


def _bench_engine():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_engine_under_test", ROOT / "bench" / "bench_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_engine_mode_agreement_is_exact_on_cpu_and_reported_on_gpu():
    check = _bench_engine().check_same_images
    base = {"mode": "packed", "steps": {("a", 0): 5, ("a", 1): 7},
            "latents": {("a", 0): torch.zeros(4), ("a", 1): torch.zeros(4)}}
    close = {**base, "mode": "static", "latents": {k: v + 1e-6 for k, v in base["latents"].items()}}
    gpu_like = {**base, "mode": "static", "steps": {("a", 0): 5, ("a", 1): 8},
                "latents": {k: v + 3e-3 for k, v in base["latents"].items()}}
    assert check([base, close]) == pytest.approx(1e-6)
    with pytest.raises(SystemExit, match="stopped 1 samples at different steps"):
        check([base, gpu_like])
    # On a GPU (TF32 / bf16, forward batches of other sizes) the same runs are measured, not fatal.
    assert check([base, gpu_like], exact=False) == pytest.approx(3e-3)


def test_a_subset_step_passes_the_plan_width_so_the_kernel_sees_one_k(model, monkeypatch):
    """A full step and a subset step hand the fused step the same number of row columns (the plan's), so on
    CUDA the autotuner and compiler see one K per latent shape, both done in warm-up."""
    from models.sampler import MAX_ROWS_PER_SAMPLE, SamplerParams, SlotBatch, noise_for_seed
    batch = SlotBatch(model, capacity=4, max_rows=12, sample_shape=(1, 8, 8), null_label=TINY.null_label,
                      guided_channels=1)
    for seed, rows in ((0, [(1, 1.5), (TINY.null_label, -0.5)]), (1, [(2, 1.0)])):
        batch.admit(noise_for_seed(seed, (1, 8, 8)), rows, SamplerParams(step_size=0.05, max_steps=5))
    widths = []
    descent = batch.rules["nag"]
    real = descent.launch
    monkeypatch.setattr(descent, "launch", lambda batch_, out, slots, rows, weights, k: widths.append(rows.shape[1])
                        or real(batch_, out, slots, rows, weights, k))
    batch.step()
    batch.step(slots=[batch.order[1]])
    assert widths == [MAX_ROWS_PER_SAMPLE, MAX_ROWS_PER_SAMPLE]
