"""Tests for kernels/nag_step.py: spec, reference, Triton kernel, launcher checks.

The Triton kernel runs on CPU under the Triton interpreter. TRITON_INTERPRET=1
has to be in the environment before triton is first imported in the process
(triton.language's own helpers, e.g. tl.sum, are decorated at that import), so
it is set here before kernels.nag_step (which imports triton) is imported.
If something imported triton earlier in this pytest process, the in-process
interpreter tests are skipped and test_interpreter_in_subprocess re-runs this
file in a fresh interpreter instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Only while triton is not imported yet: flipping the variable later would
# leave this process with a mix of interpreted and compiled triton functions.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels.nag_step as ns  # noqa: E402  (must follow the env setup above)

INTERP_OK = ns.HAS_TRITON and ns._INTERPRETING and not ns._interpreter_mismatch()
needs_interp = pytest.mark.skipif(
    not INTERP_OK, reason="triton was imported without TRITON_INTERPRET=1 in this process; "
                          "covered by test_interpreter_in_subprocess")

FIELDS = ("out", "x", "m", "model_in", "slot_ids", "rows", "weights", "eta", "mu", "threshold",
          "max_steps", "steps", "norm", "finished")
STATE = ("x", "m", "model_in", "steps", "norm", "finished")  # written in place


# --------------------------------------------------------------------------- #
# Spec, written as plainly as possible (one sample at a time)
# --------------------------------------------------------------------------- #
def naive_step(st, G):
    out, x, m, model_in = st["out"], st["x"], st["m"], st["model_in"]
    A, K = st["rows"].shape
    for a in range(A):
        s = int(st["slot_ids"][a])
        valid = [int(r) for r in st["rows"][a] if int(r) >= 0]
        assert valid[0] == int(st["rows"][a, 0])
        g = out[valid[0]].float().clone()
        g[:G] = 0.0
        for k in range(K):
            r = int(st["rows"][a, k])
            if r >= 0:
                g[:G] += st["weights"][a, k] * out[r, :G].float()
        n = torch.sqrt((g.double() ** 2).sum()).float()
        st["norm"][s] = n
        if n < st["threshold"][s]:
            st["finished"][s] = 1
        else:
            x[s] = x[s] + st["eta"][s] * g
            m[s] = g
            st["steps"][s] += 1
            st["finished"][s] = int(st["steps"][s] >= st["max_steps"][s])
        look = x[s] + st["eta"][s] * st["mu"][s] * m[s]
        for r in valid:
            model_in[r] = look.to(model_in.dtype)


# --------------------------------------------------------------------------- #
# Case generation
# --------------------------------------------------------------------------- #
def make_case(C, H, W, K, *, G=None, out_dtype=torch.float32, mi_dtype=torch.float32,
              S=7, A=4, seed=0, idx_dtype=torch.int64, fin_dtype=torch.int8, device="cpu"):
    """A batch in which, by listed position a % 4: 0 stops below threshold,
    1 hits max_steps, 2 never stops (threshold 0, mu 0 = plain GD), 3 steps on.
    Slots are a scattered, unordered subset; rows are shuffled, include -1
    padding in any column but 0 and leave some rows of `out` unreferenced."""
    G = C if G is None else G
    gen = torch.Generator().manual_seed(seed)
    R = A * K + 3
    slot_ids = torch.randperm(S, generator=gen)[:A]
    pool = torch.randperm(R, generator=gen).tolist()
    rows = torch.full((A, K), -1, dtype=torch.int64)
    for a in range(A):
        n_rows = K if a % 2 == 0 else int(torch.randint(1, K + 1, (1,), generator=gen))
        cols = [0] + (1 + torch.randperm(K - 1, generator=gen)).tolist()[: n_rows - 1]
        for c in cols:
            rows[a, c] = pool.pop()
    weights = torch.randn(A, K, generator=gen) * 2
    weights[rows < 0] = 123.0  # padding weights must be ignored
    st = dict(
        out=(torch.randn(R, C, H, W, generator=gen) * 0.5).to(out_dtype),
        x=torch.randn(S, C, H, W, generator=gen),
        m=torch.randn(S, C, H, W, generator=gen),
        model_in=torch.randn(R, C, H, W, generator=gen).to(mi_dtype),
        slot_ids=slot_ids.to(idx_dtype),
        rows=rows.to(idx_dtype),
        weights=weights,
        eta=torch.rand(S, generator=gen) * 0.1 + 0.01,
        mu=torch.rand(S, generator=gen) * 0.9,
        threshold=torch.zeros(S),
        max_steps=torch.randint(5, 50, (S,), generator=gen, dtype=torch.int32),
        steps=torch.randint(0, 4, (S,), generator=gen, dtype=torch.int32),
        norm=torch.full((S,), -1.0),
        finished=torch.randint(0, 2, (S,), generator=gen).to(fin_dtype),
    )
    # Place thresholds far from the actual norms so both implementations agree
    # on every stop decision.
    probe = clone(st)
    naive_step(probe, G)
    for a in range(A):
        s = int(slot_ids[a])
        n = float(probe["norm"][s])
        role = a % 4
        st["threshold"][s] = {0: 2.0 * n, 1: 0.5 * n, 2: 0.0, 3: 0.5 * n}[role]
        if role == 1:
            st["steps"][s] = st["max_steps"][s] - 1
        if role == 2:
            st["mu"][s] = 0.0
    return {k: v.to(device) for k, v in st.items()}, G


def clone(st):
    return {k: v.clone() for k, v in st.items()}


def bits(t):
    """Bit pattern view, so 'untouched' means bitwise equal."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
              torch.bool: torch.uint8}
    return t.view(as_int[t.dtype]) if t.dtype in as_int else t


def assert_untouched(before, after):
    """Unlisted slots, unreferenced rows and frozen slots keep their bits."""
    S = before["x"].shape[0]
    R = before["out"].shape[0]
    listed = set(before["slot_ids"].tolist())
    used = {r for r in before["rows"].flatten().tolist() if r >= 0}
    for s in range(S):
        names = ("x", "m", "steps", "norm", "finished") if s not in listed else ()
        if s in listed and after["norm"][s] < before["threshold"][s]:
            names = ("x", "m", "steps")  # stopped below threshold: frozen
        for name in names:
            assert torch.equal(bits(before[name][s]), bits(after[name][s])), (name, s)
    for r in range(R):
        if r not in used:
            assert torch.equal(bits(before["model_in"][r]), bits(after["model_in"][r])), ("model_in", r)
    for name in FIELDS:
        if name not in STATE:
            assert torch.equal(bits(before[name]), bits(after[name])), f"input {name} modified"


def assert_state_close(got, want):
    for name in ("x", "m", "norm"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(got["steps"], want["steps"])
    assert torch.equal(got["finished"], want["finished"])
    mi_dtype = want["model_in"].dtype
    if mi_dtype == torch.float32:
        torch.testing.assert_close(got["model_in"], want["model_in"], rtol=1e-5, atol=1e-6)
    else:
        # Both sides round the same fp32 value (up to fp32 rounding) to
        # bf16/fp16: allow one ulp of the narrow type.
        eps = torch.finfo(mi_dtype).eps
        torch.testing.assert_close(got["model_in"].float(), want["model_in"].float(), rtol=eps, atol=1e-6)


def run(fn, st, G):
    out = clone(st)
    assert fn(**out, guided_channels=G) is None
    return out


def check_triton_vs_reference(st, G):
    ref = run(ns.nag_step_reference, st, G)
    tri = run(ns.nag_step_triton, st, G)
    assert_untouched(st, ref)
    assert_untouched(st, tri)
    assert_state_close(tri, ref)
    # The batch really mixes the three outcomes.
    listed = st["slot_ids"].long()
    assert bool((ref["steps"][listed] == st["steps"][listed]).any())  # a frozen slot
    assert bool((ref["finished"][listed] == 0).any())                  # one that goes on
    return tri, ref


# --------------------------------------------------------------------------- #
# Reference against the spec
# --------------------------------------------------------------------------- #
def test_reference_hand_computed():
    # Slot 2 (rows [1, 0], weights [2, -1], G=1 of C=2) steps; slot 0 stops
    # below threshold; slot 1 is not listed.
    st = dict(
        out=torch.tensor([[1.0, 9.0], [2.0, 4.0], [0.3, 0.4]]).view(3, 2, 1, 1),
        x=torch.tensor([[1.0, -1.0], [7.0, 7.0], [1.0, 1.0]]).view(3, 2, 1, 1),
        m=torch.tensor([[2.0, 2.0], [7.0, 7.0], [0.0, 0.0]]).view(3, 2, 1, 1),
        model_in=torch.zeros(3, 2, 1, 1),
        slot_ids=torch.tensor([2, 0]),
        rows=torch.tensor([[1, 0], [2, -1]]),
        weights=torch.tensor([[2.0, -1.0], [1.0, 99.0]]),
        eta=torch.tensor([0.1, 1.0, 0.5]), mu=torch.tensor([0.5, 1.0, 0.5]),
        threshold=torch.tensor([1.0, 1.0, 1.0]),
        max_steps=torch.tensor([10, 10, 10], dtype=torch.int32),
        steps=torch.tensor([3, 4, 0], dtype=torch.int32),
        norm=torch.zeros(3), finished=torch.zeros(3, dtype=torch.int8),
    )
    ns.nag_step_reference(**st, guided_channels=1)
    # slot 2: g = [2*2 - 1*1, 4] = [3, 4], |g| = 5 -> x = [1, 1] + 0.5 g, m = g
    assert st["x"][2].flatten().tolist() == [2.5, 3.0]
    assert st["m"][2].flatten().tolist() == [3.0, 4.0]
    # look-ahead x + 0.5*0.5*m = [3.25, 4] into both of its rows
    assert st["model_in"][1].flatten().tolist() == [3.25, 4.0]
    assert st["model_in"][0].flatten().tolist() == [3.25, 4.0]
    # slot 0: g = [0.3, 0.4], |g| = 0.5 < 1 -> frozen; look-ahead from old state
    assert st["x"][0].flatten().tolist() == [1.0, -1.0]
    assert st["m"][0].flatten().tolist() == [2.0, 2.0]
    torch.testing.assert_close(st["model_in"][2].flatten(), torch.tensor([1.1, -0.9]))
    torch.testing.assert_close(st["norm"], torch.tensor([0.5, 0.0, 5.0]))
    assert st["steps"].tolist() == [3, 4, 1]
    assert st["finished"].tolist() == [1, 0, 0]
    assert st["x"][1].flatten().tolist() == [7.0, 7.0]


@pytest.mark.parametrize("C,H,W,K,G,out_dtype,mi_dtype", [
    (3, 5, 7, 1, 3, torch.float32, torch.float32),
    (4, 8, 8, 2, 3, torch.bfloat16, torch.float16),
    (4, 8, 8, 3, 4, torch.float16, torch.bfloat16),
    (1, 8, 8, 3, 1, torch.float32, torch.bfloat16),
])
def test_reference_matches_naive(C, H, W, K, G, out_dtype, mi_dtype):
    st, G = make_case(C, H, W, K, G=G, out_dtype=out_dtype, mi_dtype=mi_dtype, S=9, A=6, seed=K)
    want = clone(st)
    naive_step(want, G)
    got = run(ns.nag_step_reference, st, G)
    assert_untouched(st, want)
    assert_untouched(st, got)
    assert_state_close(got, want)


def test_reference_bool_finished_and_int32_indices():
    st, G = make_case(2, 3, 3, 2, idx_dtype=torch.int32, fin_dtype=torch.bool)
    want = clone(st)
    naive_step(want, G)
    got = run(ns.nag_step_reference, st, G)
    assert got["finished"].dtype == torch.bool
    assert_state_close(got, want)


def _boundary_case(fn_name):
    # g = 0.5 everywhere on 1x8x8: ||g|| = sqrt(64 * 0.25) = 4 exactly in fp32.
    # Slot 0 has threshold exactly 4 (not below: steps), slot 1 the next float
    # above 4 (below: stops).
    four = torch.tensor(4.0)
    st = dict(
        out=torch.full((2, 1, 8, 8), 0.5), x=torch.zeros(2, 1, 8, 8), m=torch.zeros(2, 1, 8, 8),
        model_in=torch.zeros(2, 1, 8, 8), slot_ids=torch.tensor([1, 0]), rows=torch.tensor([[1], [0]]),
        weights=torch.ones(2, 1), eta=torch.ones(2), mu=torch.zeros(2),
        threshold=torch.stack([four, torch.nextafter(four, torch.tensor(5.0))]),
        max_steps=torch.full((2,), 9, dtype=torch.int32), steps=torch.zeros(2, dtype=torch.int32),
        norm=torch.zeros(2), finished=torch.zeros(2, dtype=torch.int8),
    )
    getattr(ns, fn_name)(**st, guided_channels=1)
    assert st["norm"].tolist() == [4.0, 4.0]
    assert st["steps"].tolist() == [1, 0]
    assert st["finished"].tolist() == [0, 1]


def test_reference_threshold_boundary():
    _boundary_case("nag_step_reference")


# --------------------------------------------------------------------------- #
# Triton kernel (interpreter) against the reference
# --------------------------------------------------------------------------- #
_DT = (torch.float32, torch.bfloat16, torch.float16)


@needs_interp
@pytest.mark.parametrize("out_dtype", _DT, ids=str)
@pytest.mark.parametrize("mi_dtype", _DT, ids=str)
def test_triton_dtypes(out_dtype, mi_dtype):
    st, G = make_case(3, 5, 7, 2, G=2, out_dtype=out_dtype, mi_dtype=mi_dtype, seed=1)
    check_triton_vs_reference(st, G)


@needs_interp
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("G", [3, 4], ids=["G3of4", "G4of4"])
def test_triton_rows_and_guided_channels(K, G):
    # 4x32x32 = 4096 elements: larger than the interpreter's block, so this is
    # the chunked (recompute) path.
    st, G = make_case(4, 32, 32, K, G=G, out_dtype=torch.bfloat16, mi_dtype=torch.bfloat16,
                      S=6, A=4, seed=10 + K)
    check_triton_vs_reference(st, G)


@needs_interp
@pytest.mark.parametrize("C,H,W", [(1, 8, 8), (3, 5, 7), (3, 23, 29), (4, 64, 64)])
def test_triton_sizes(C, H, W):
    st, G = make_case(C, H, W, 3, out_dtype=torch.float16, mi_dtype=torch.float32, S=5, A=4, seed=C * H)
    check_triton_vs_reference(st, G)


@needs_interp
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("fin_dtype", [torch.int8, torch.bool], ids=str)
def test_triton_index_and_flag_dtypes(idx_dtype, fin_dtype):
    st, G = make_case(2, 4, 4, 2, idx_dtype=idx_dtype, fin_dtype=fin_dtype, seed=3)
    tri, _ = check_triton_vs_reference(st, G)
    assert tri["finished"].dtype == fin_dtype


@needs_interp
def test_triton_threshold_boundary():
    _boundary_case("nag_step_triton")


@needs_interp
def test_triton_several_steps():
    # Feed the look-ahead rows' state forward for a few steps; slots finish
    # along the way and must stay frozen once below threshold.
    st, G = make_case(4, 6, 6, 2, out_dtype=torch.bfloat16, mi_dtype=torch.bfloat16, seed=5)
    ref, tri = clone(st), clone(st)
    for step in range(3):
        ns.nag_step_reference(**ref, guided_channels=G)
        ns.nag_step_triton(**tri, guided_channels=G)
        assert_state_close(tri, ref)
        # new model output for the next step
        noise = torch.randn(st["out"].shape, generator=torch.Generator().manual_seed(step))
        ref["out"] = tri["out"] = (ref["out"].float() * 0.9 + 0.1 * noise).to(st["out"].dtype)


@needs_interp
def test_triton_empty_batch_is_noop():
    st, G = make_case(2, 4, 4, 2, A=2)
    st["slot_ids"] = st["slot_ids"][:0]
    st["rows"] = st["rows"][:0]
    st["weights"] = st["weights"][:0]
    got = run(ns.nag_step_triton, st, G)
    for name in FIELDS:
        assert torch.equal(bits(got[name]), bits(st[name]))


def _freeze_case(fn_name, K=2, C=2, H=4, W=4):
    """freeze_finished: listed slots already finished keep every bit; the others step as usual."""
    st, G = make_case(C, H, W, K, seed=7, S=7, A=4)
    listed = st["slot_ids"].long()
    st["finished"][listed] = torch.tensor([1, 0, 1, 0], dtype=st["finished"].dtype)
    got = clone(st)
    getattr(ns, fn_name)(**got, guided_channels=G, freeze_finished=True)
    # Expected: the same step on the unfinished listed samples only.
    live = st["finished"][listed] == 0
    want = clone(st)
    want["slot_ids"], want["rows"], want["weights"] = st["slot_ids"][live], st["rows"][live], st["weights"][live]
    ns.nag_step_reference(**want, guided_channels=G)
    want["slot_ids"], want["rows"], want["weights"] = st["slot_ids"], st["rows"], st["weights"]
    assert_state_close(got, want)
    for s in listed[~live].tolist():
        for name in ("x", "m", "steps", "norm", "finished"):
            assert torch.equal(bits(got[name][s]), bits(st[name][s])), (name, s)
    for r in st["rows"][~live].flatten().tolist():
        if r >= 0:
            assert torch.equal(bits(got["model_in"][r]), bits(st["model_in"][r]))
    assert bool((got["steps"][listed[live]] != st["steps"][listed[live]]).any())    # the others did move


def test_reference_freeze_finished():
    _freeze_case("nag_step_reference")


@needs_interp
@pytest.mark.parametrize("C,H,W", [(2, 4, 4), (4, 32, 32)])
def test_triton_freeze_finished(C, H, W):
    _freeze_case("nag_step_triton", C=C, H=H, W=W)


def test_dispatcher(monkeypatch):
    st, G = make_case(2, 4, 4, 2)
    calls = []
    monkeypatch.setattr(ns, "nag_step_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(ns, "nag_step_reference", lambda *a, **k: calls.append("reference"))
    monkeypatch.delenv("EQM_FORCE_TRITON", raising=False)
    ns.nag_step(**clone(st), guided_channels=G)
    monkeypatch.setenv("EQM_FORCE_TRITON", "1")
    ns.nag_step(**clone(st), guided_channels=G)
    assert calls == ["reference", "triton"]


# --------------------------------------------------------------------------- #
# Launcher checks
# --------------------------------------------------------------------------- #
def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD_ARGS = [
    ("out", lambda st: st["out"][0], "out must be 4-D"),
    ("out", lambda st: st["out"].to(torch.float64), "out must be float32/bfloat16/float16"),
    ("model_in", lambda st: st["model_in"][:-1], "model_in shape"),
    ("model_in", lambda st: st["model_in"].to(torch.int32), "model_in must be"),
    ("x", lambda st: st["x"].double(), "x must be float32"),
    ("x", lambda st: st["x"][:, :, :1], "x must be (S,"),
    ("m", lambda st: st["m"][:-1], "m shape"),
    ("slot_ids", lambda st: st["slot_ids"].float(), "slot_ids must be a 1-D int32/int64"),
    ("rows", lambda st: st["rows"][:-1], "rows must be an int32/int64"),
    ("rows", lambda st: st["rows"].repeat(1, 5), "rows must have 1..8 columns"),
    ("weights", lambda st: st["weights"].double(), "weights must be float32"),
    ("eta", lambda st: st["eta"][:-1], "eta must have shape"),
    ("steps", lambda st: st["steps"].long(), "steps must be int32"),
    ("finished", lambda st: st["finished"].float(), "finished must be int8/uint8/bool"),
    ("norm", lambda st: torch.zeros(st["norm"].shape, device="meta"), "norm is on meta"),
    ("slot_ids", lambda st: st["slot_ids"] + 100, "slot_ids must lie in"),
    ("slot_ids", lambda st: st["slot_ids"][[0, 0, 1, 2]], "must not repeat"),
    ("rows", lambda st: st["rows"] + 100, "rows must lie in"),
    ("rows", lambda st: _with(st["rows"], (1, 0), -1), "primary row"),
    ("rows", lambda st: _with(st["rows"], (1, 0), st["rows"][0, 0]), "listed twice"),
    ("guided_channels", lambda st: 0, "guided_channels must be in 1..2"),
    ("guided_channels", lambda st: 3, "guided_channels must be in 1..2"),
    ("guided_channels", lambda st: True, "guided_channels must be an int"),
]


@pytest.mark.parametrize("fn", ["nag_step_reference", "nag_step_triton"])
@pytest.mark.parametrize("name,value_fn,message", BAD_ARGS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_ARGS)])
def test_bad_arguments(fn, name, value_fn, message):
    st, G = make_case(2, 4, 4, 2)
    args = dict(clone(st), guided_channels=G)
    args[name] = value_fn(st)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        getattr(ns, fn)(**args)
    assert "\n" not in str(info.value)


def test_triton_rejects_non_contiguous():
    st, G = make_case(2, 4, 4, 2)
    args = dict(clone(st), guided_channels=G)
    args["x"] = st["x"].transpose(2, 3)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ns.nag_step_triton(**args)


# --------------------------------------------------------------------------- #
# Fallback: interpreter tests in a fresh process; compiled kernel on CUDA
# --------------------------------------------------------------------------- #
def test_interpreter_in_subprocess():
    if INTERP_OK:
        pytest.skip("interpreter tests ran in this process")
    if not ns.HAS_TRITON:
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not gpu", "-p", "no:cacheprovider",
         str(Path(__file__).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("C,H,W,K,G,out_dtype,mi_dtype", [
    (4, 32, 32, 2, 4, torch.bfloat16, torch.bfloat16),
    (4, 32, 32, 3, 3, torch.float16, torch.float32),
    (3, 5, 7, 1, 3, torch.float32, torch.float16),
    (4, 64, 64, 2, 4, torch.bfloat16, torch.bfloat16),
])
def test_cuda_matches_reference(C, H, W, K, G, out_dtype, mi_dtype):
    # Not a skip: on a CUDA machine an interpreter left on would silently leave the compiled kernel untested.
    assert not ns._INTERPRETING, "TRITON_INTERPRET=1 on a CUDA machine: unset it to test the compiled kernel"
    # The first call per shape autotunes on the caller's live state; it must
    # still leave exactly one step applied.
    st, G = make_case(C, H, W, K, G=G, out_dtype=out_dtype, mi_dtype=mi_dtype, S=16, A=12, seed=7)
    ref = run(ns.nag_step_reference, st, G)
    gpu = {k: v.cuda() for k, v in st.items()}
    ns.nag_step(**gpu, guided_channels=G)
    torch.cuda.synchronize()
    got = {k: v.cpu() for k, v in gpu.items()}
    assert_untouched(st, got)
    assert_state_close(got, ref)
