"""One fused NAG-GD sampling step for Equilibrium Matching (EqM).

Every sampling step the service evaluates the model once on a batch of R rows
(one row per (sample, condition): ``[y, null]`` for classifier-free guidance,
``[y1, y2, null]`` for a composition, ``[y]`` without guidance) and gets
``out`` (R, C, H, W). Each sample lives in a slot ``s`` of fixed-capacity state
arrays. For the a-th listed slot ``s = slot_ids[a]``:

1. ``g = sum_k weights[a, k] * out[rows[a, k]]`` on channels ``c < G`` (valid
   k only; ``rows[a, k] == -1`` is padding) and ``g = out[rows[a, 0]]`` on
   channels ``c >= G`` (the official EqM "3 of 4 channels" CFG quirk is G=3,
   C=4; the normal mode is G=C). float32 accumulation.
2. ``norm[s] = ||g||_2`` over all C*H*W elements.
3. If ``norm[s] < threshold[s]``: ``finished[s] = 1`` and x, m, steps keep
   their values. Otherwise ``x[s] += eta[s] * g``, ``m[s] = g``,
   ``steps[s] += 1``, ``finished[s] = steps[s] >= max_steps[s]``.
4. Every valid row r of the sample gets the Nesterov look-ahead point where
   the model is evaluated next step:
   ``model_in[r] = x[s] + eta[s] * mu[s] * m[s]`` (cast to model_in's dtype),
   whether or not the sample finished.

Slots not listed, and rows not referenced, are not touched. With
``freeze_finished=True`` a listed slot whose ``finished`` flag is already set
is not touched either (nothing of it is read or written): the engine may step a
sample once more before its host learns that it finished (the status read-back
lags one step on CUDA), and that extra step must change nothing.

Preconditions the launchers check only for CPU tensors (checking CUDA tensors
would cost a device sync every step): slot ids lie in [0, S) and are unique;
rows lie in [-1, R), ``rows[:, 0]`` is valid, and no row is listed twice.

``nag_step_triton`` does it in one launch, one program per listed sample.
``nag_step_reference`` is the same math in eager torch and is the production
CPU path. ``nag_step`` picks between them.

The Triton path needs ``TRITON_INTERPRET=1`` to run on CPU tensors, and the
variable must be set before the first ``import triton`` in the process: the
interpreter only takes over kernels decorated while it is on, and that
includes triton.language's own helpers such as ``tl.sum``.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is an optional dependency; the CPU path needs none
    triton = None
    tl = None
    HAS_TRITON = False
    _INTERPRETING = False

__all__ = ["MAX_ROWS_PER_SAMPLE", "nag_step", "nag_step_reference", "nag_step_triton", "HAS_TRITON"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_FLAG_DTYPES = (torch.int8, torch.uint8, torch.bool)
MAX_ROWS_PER_SAMPLE = 8      # the fused step combines at most this many rows per sample
# Interpreter runs skip autotuning (it benchmarks on a GPU). 1024 is smaller
# than the main 4x32x32 latent, so CPU tests cover both the single-block and the
# chunked kernel paths.
_INTERPRET_BLOCK = 1024


def _interpret_requested():
    """Whether ``@triton.jit`` builds interpreted kernels in this process.

    Read the way ``triton.jit`` itself reads it: ``triton.knobs`` exists only from Triton 3.4 on, and
    before it the decorator compares ``TRITON_INTERPRET`` with ``"1"``.
    """
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- #
# Argument checks shared by the reference and the launcher
# --------------------------------------------------------------------------- #
def _check_args(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
                max_steps, steps, norm, finished, guided_channels):
    """Raise a one-line ValueError for inconsistent arguments; return (A, K)."""
    tensors = dict(out=out, x=x, m=m, model_in=model_in, slot_ids=slot_ids, rows=rows,
                   weights=weights, eta=eta, mu=mu, threshold=threshold, max_steps=max_steps,
                   steps=steps, norm=norm, finished=finished)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"nag_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if t.device != out.device:
            raise ValueError(f"nag_step: {name} is on {t.device} but out is on {out.device}")

    if out.dim() != 4:
        raise ValueError(f"nag_step: out must be 4-D (R, C, H, W), got shape {tuple(out.shape)}")
    R, C, H, W = out.shape
    if out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nag_step: out must be float32/bfloat16/float16, got {out.dtype}")
    if model_in.shape != out.shape:
        raise ValueError(f"nag_step: model_in shape {tuple(model_in.shape)} != out shape {tuple(out.shape)}")
    if model_in.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nag_step: model_in must be float32/bfloat16/float16, got {model_in.dtype}")
    for name, t in (("x", x), ("m", m)):
        if t.dim() != 4 or tuple(t.shape[1:]) != (C, H, W):
            raise ValueError(f"nag_step: {name} must be (S, {C}, {H}, {W}) like out's rows, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"nag_step: {name} must be float32, got {t.dtype}")
    if m.shape != x.shape:
        raise ValueError(f"nag_step: m shape {tuple(m.shape)} != x shape {tuple(x.shape)}")
    S = x.shape[0]

    if slot_ids.dim() != 1 or slot_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"nag_step: slot_ids must be a 1-D int32/int64 tensor, "
                         f"got {slot_ids.dtype} of shape {tuple(slot_ids.shape)}")
    A = slot_ids.shape[0]
    if rows.dim() != 2 or rows.shape[0] != A or rows.dtype not in _INDEX_DTYPES:
        raise ValueError(f"nag_step: rows must be an int32/int64 (A={A}, K) tensor, "
                         f"got {rows.dtype} of shape {tuple(rows.shape)}")
    K = rows.shape[1]
    if not 1 <= K <= MAX_ROWS_PER_SAMPLE:
        raise ValueError(f"nag_step: rows must have 1..{MAX_ROWS_PER_SAMPLE} columns, got {K}")
    if weights.shape != rows.shape or weights.dtype != torch.float32:
        raise ValueError(f"nag_step: weights must be float32 of shape {tuple(rows.shape)}, "
                         f"got {weights.dtype} of shape {tuple(weights.shape)}")

    per_slot = (("eta", eta, (torch.float32,)), ("mu", mu, (torch.float32,)),
                ("threshold", threshold, (torch.float32,)), ("max_steps", max_steps, (torch.int32,)),
                ("steps", steps, (torch.int32,)), ("norm", norm, (torch.float32,)),
                ("finished", finished, _FLAG_DTYPES))
    for name, t, dtypes in per_slot:
        if tuple(t.shape) != (S,):
            raise ValueError(f"nag_step: {name} must have shape ({S},), got {tuple(t.shape)}")
        if t.dtype not in dtypes:
            allowed = "/".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"nag_step: {name} must be {allowed}, got {t.dtype}")

    if isinstance(guided_channels, bool) or not isinstance(guided_channels, int):
        raise ValueError(f"nag_step: guided_channels must be an int, got {type(guided_channels).__name__}")
    if not 1 <= guided_channels <= C:
        raise ValueError(f"nag_step: guided_channels must be in 1..{C}, got {guided_channels}")

    # Index values: only for CPU tensors, where reading them is free. On CUDA it
    # would synchronise the stream once per step; the caller guarantees them.
    if A > 0 and not out.is_cuda:
        if int(slot_ids.min()) < 0 or int(slot_ids.max()) >= S:
            raise ValueError(f"nag_step: slot_ids must lie in [0, {S})")
        if torch.unique(slot_ids).numel() != A:
            raise ValueError("nag_step: slot_ids must not repeat a slot")
        if int(rows.min()) < -1 or int(rows.max()) >= R:
            raise ValueError(f"nag_step: rows must lie in [0, {R}) or be -1 (padding)")
        if bool((rows[:, 0] < 0).any()):
            raise ValueError("nag_step: rows[:, 0] (the primary row) must be valid, got -1")
        valid_rows = rows[rows >= 0]
        if torch.unique(valid_rows).numel() != valid_rows.numel():
            raise ValueError("nag_step: a row index is listed twice")
    return A, K


# --------------------------------------------------------------------------- #
# Torch reference (production CPU path)
# --------------------------------------------------------------------------- #
def nag_step_reference(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
                       max_steps, steps, norm, finished, guided_channels, freeze_finished=False):
    """Eager-torch NAG-GD step for the listed slots; updates state in place."""
    A, K = _check_args(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
                       max_steps, steps, norm, finished, guided_channels)
    if A > 0 and freeze_finished:
        # Already-finished slots drop out of the step (boolean indexing syncs on CUDA; this is the CPU path).
        live = finished.index_select(0, slot_ids.long()) == 0
        if not bool(live.all()):
            slot_ids, rows, weights = slot_ids[live], rows[live], weights[live]
            A = slot_ids.shape[0]
    if A == 0:
        return None
    G = guided_channels
    sid = slot_ids.long()
    valid = rows >= 0
    # Padding entries are pointed at the sample's own primary row: the gather
    # stays in bounds, their contribution is masked out below, and rewriting the
    # primary row of model_in with the same value is harmless.
    rws = torch.where(valid, rows, rows[:, :1]).long()
    per_sample = (A, 1, 1, 1)  # broadcasts a per-sample scalar over (C, H, W)

    # 1. combination, float32: weighted sum on channels < G, primary row beyond
    g = out.index_select(0, rws[:, 0]).float()
    guided = g[:, :G] * weights[:, 0].view(per_sample)
    for k in range(1, K):
        contrib = weights[:, k].view(per_sample) * out.index_select(0, rws[:, k])[:, :G].float()
        guided += torch.where(valid[:, k].view(per_sample), contrib, 0.0)
    g[:, :G] = guided

    # 2. gradient norm over all C*H*W elements
    n = torch.linalg.vector_norm(g.flatten(1), dim=1)
    norm.index_copy_(0, sid, n)

    # 3. stop below threshold (state frozen), otherwise one NAG step
    stop = n < threshold.index_select(0, sid)
    move = (~stop).view(per_sample)
    e = eta.index_select(0, sid)
    x_old = x.index_select(0, sid)
    x_new = torch.where(move, x_old + e.view(per_sample) * g, x_old)
    m_new = torch.where(move, g, m.index_select(0, sid))
    # Frozen slots are written back with their own bits, i.e. unchanged.
    x.index_copy_(0, sid, x_new)
    m.index_copy_(0, sid, m_new)
    st = steps.index_select(0, sid) + (~stop).to(steps.dtype)
    steps.index_copy_(0, sid, st)
    fin = stop | (st >= max_steps.index_select(0, sid))
    finished.index_copy_(0, sid, fin.to(finished.dtype))

    # 4. Nesterov look-ahead point into every row of the sample
    la = (e * mu.index_select(0, sid)).view(per_sample)
    look = (x_new + la * m_new).to(model_in.dtype)
    for k in range(K):
        model_in.index_copy_(0, rws[:, k], look)
    return None


# --------------------------------------------------------------------------- #
# Triton kernel
# --------------------------------------------------------------------------- #
if HAS_TRITON:
    # Per-sample traffic is ~(K+2) rows of N elements, so the block size only
    # trades registers for loop trips; N = 4096 (4x32x32) is the main case.
    # (BLOCK, num_warps) pairs; the autotuner itself is built at the first
    # compiled launch (_tuned_kernel).
    _CONFIGS_GPU = ((1024, 4), (2048, 4), (4096, 8), (8192, 8))
    _INTERPRETING = _interpret_requested()

    def _prune_configs(configs, named_args, **kwargs):
        # A block past the next power of two >= N only adds masked-off lanes.
        n = kwargs.get("N", named_args.get("N"))
        cap = max(triton.next_power_of_2(n), configs[0].kwargs["BLOCK"])
        return [c for c in configs if c.kwargs["BLOCK"] <= cap]

    @triton.jit
    def _combine_chunk(out_ptr, rows_ptr, weights_ptr, a, offs, mask,
                       N: tl.constexpr, GN: tl.constexpr, K: tl.constexpr):
        """g (float32) at element offsets `offs` of the a-th listed sample."""
        # Channels c < G are the first G*H*W elements of a contiguous (C, H, W)
        # row, so "guided" is the prefix offs < GN. Past it the primary row is
        # passed through (weight 1) and the other rows are not read at all.
        guided = offs < GN
        r0 = tl.load(rows_ptr + a * K).to(tl.int64)
        w0 = tl.load(weights_ptr + a * K)
        g = tl.load(out_ptr + r0 * N + offs, mask=mask, other=0.0).to(tl.float32)
        g = g * tl.where(guided, w0, 1.0)
        for k in tl.static_range(1, K):
            rk = tl.load(rows_ptr + a * K + k).to(tl.int64)
            # -1 = padding: uniform branch per program, so the row is skipped
            # rather than read and multiplied by zero.
            if rk >= 0:
                wk = tl.load(weights_ptr + a * K + k)
                v = tl.load(out_ptr + rk * N + offs, mask=mask & guided, other=0.0)
                g += wk * v.to(tl.float32)
        return g

    @triton.jit
    def _apply_chunk(g, x_ptr, m_ptr, model_in_ptr, rows_ptr, a, slot, offs, mask,
                     stop, eta, la, N: tl.constexpr, K: tl.constexpr):
        """Stage 3 for one chunk: move (or keep) x/m, write the look-ahead rows."""
        xo = tl.load(x_ptr + slot * N + offs, mask=mask)
        if stop:
            # Converged below threshold: x and m are read, never written.
            x_new = xo
            m_new = tl.load(m_ptr + slot * N + offs, mask=mask)
        else:
            # Moving: m's old value is dead, so it is not even read.
            x_new = xo + eta * g
            m_new = g
            tl.store(x_ptr + slot * N + offs, x_new, mask=mask)
            tl.store(m_ptr + slot * N + offs, m_new, mask=mask)
        look = (x_new + la * m_new).to(model_in_ptr.dtype.element_ty)
        for k in tl.static_range(K):
            rk = tl.load(rows_ptr + a * K + k).to(tl.int64)
            if rk >= 0:
                tl.store(model_in_ptr + rk * N + offs, look, mask=mask)

    @triton.jit
    def _step_sample(out_ptr, x_ptr, m_ptr, model_in_ptr, rows_ptr, weights_ptr,
                     eta_ptr, mu_ptr, threshold_ptr, max_steps_ptr, steps_ptr, norm_ptr, finished_ptr,
                     a, slot, N: tl.constexpr, GN: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
        """Stages 1-3 for the a-th listed sample, which lives in ``slot``."""
        offs0 = tl.arange(0, BLOCK)

        # ---- Stage 1: g and sum(g^2) over the whole sample -----------------
        # The stop decision needs the full norm before anything is written.
        if N <= BLOCK:
            # Whole sample in one block: g stays in registers for stage 3.
            mask0 = offs0 < N
            g = _combine_chunk(out_ptr, rows_ptr, weights_ptr, a, offs0, mask0, N, GN, K)
            sumsq = tl.sum(g * g, axis=0)
        else:
            # Chunked: accumulate per lane, reduce once (better rounding than a
            # running scalar). g is recomputed in stage 3 (rows are L2-hot)
            # rather than stashed, so a frozen slot's m is never overwritten.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                offs = start + offs0
                gc = _combine_chunk(out_ptr, rows_ptr, weights_ptr, a, offs, offs < N, N, GN, K)
                acc += gc * gc
            sumsq = tl.sum(acc, axis=0)
        nrm = tl.sqrt_rn(sumsq)  # IEEE sqrt: threshold decisions match torch

        # ---- Stage 2: per-slot scalars ------------------------------------
        tl.store(norm_ptr + slot, nrm)
        # `n < threshold` is false for NaN, so a NaN norm still steps (as the
        # reference does) instead of silently freezing.
        stop = nrm < tl.load(threshold_ptr + slot)
        if stop:
            tl.store(finished_ptr + slot, tl.full([], 1, finished_ptr.dtype.element_ty))
        else:
            steps = tl.load(steps_ptr + slot) + 1
            tl.store(steps_ptr + slot, steps)
            done = steps >= tl.load(max_steps_ptr + slot)
            tl.store(finished_ptr + slot, done.to(finished_ptr.dtype.element_ty))

        # ---- Stage 3: update x/m, write look-ahead rows ---------------------
        eta = tl.load(eta_ptr + slot)
        la = eta * tl.load(mu_ptr + slot)  # look-ahead = x + (eta*mu) * m
        if N <= BLOCK:
            _apply_chunk(g, x_ptr, m_ptr, model_in_ptr, rows_ptr, a, slot, offs0, mask0,
                         stop, eta, la, N, K)
        else:
            for start in range(0, N, BLOCK):
                offs = start + offs0
                mask = offs < N
                if stop:
                    gc = tl.zeros([BLOCK], dtype=tl.float32)  # unused: frozen slot
                else:
                    gc = _combine_chunk(out_ptr, rows_ptr, weights_ptr, a, offs, mask, N, GN, K)
                _apply_chunk(gc, x_ptr, m_ptr, model_in_ptr, rows_ptr, a, slot, offs, mask,
                             stop, eta, la, N, K)

    @triton.jit
    def _nag_step_kernel(out_ptr, x_ptr, m_ptr, model_in_ptr,
                         slot_ids_ptr, rows_ptr, weights_ptr,
                         eta_ptr, mu_ptr, threshold_ptr, max_steps_ptr,
                         steps_ptr, norm_ptr, finished_ptr,
                         N: tl.constexpr, GN: tl.constexpr, K: tl.constexpr,
                         FREEZE_FINISHED: tl.constexpr, BLOCK: tl.constexpr):
        # One program = one listed sample. Slots and rows are unique across
        # samples (precondition), so each program owns everything it writes:
        # no atomics, no cross-program ordering.
        a = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ids_ptr + a).to(tl.int64)
        if FREEZE_FINISHED:
            # A sample that already finished is left exactly as it is (uniform branch per program).
            if tl.load(finished_ptr + slot) == 0:
                _step_sample(out_ptr, x_ptr, m_ptr, model_in_ptr, rows_ptr, weights_ptr,
                             eta_ptr, mu_ptr, threshold_ptr, max_steps_ptr, steps_ptr, norm_ptr, finished_ptr,
                             a, slot, N, GN, K, BLOCK)
        else:
            _step_sample(out_ptr, x_ptr, m_ptr, model_in_ptr, rows_ptr, weights_ptr,
                         eta_ptr, mu_ptr, threshold_ptr, max_steps_ptr, steps_ptr, norm_ptr, finished_ptr,
                         a, slot, N, GN, K, BLOCK)

    def _interpreter_mismatch():
        """True when this module's kernels and triton.language disagree on
        interpreter mode (TRITON_INTERPRET was set after `import triton`)."""
        from triton.runtime.interpreter import InterpretedFunction
        return (isinstance(_nag_step_kernel, InterpretedFunction)
                != isinstance(tl.standard.sum, InterpretedFunction))

    _TUNED = []

    def _tuned_kernel():
        """The autotuned kernel, built at the first compiled launch rather than at import: before
        Triton 3.4 the autotuner asks the active GPU driver for its benchmarker when it is built,
        which fails on a machine without a GPU, where this module must still import."""
        if not _TUNED:
            _TUNED.append(triton.autotune(
                configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in _CONFIGS_GPU],
                key=["N", "K"],
                prune_configs_by={"early_config_prune": _prune_configs},
                # Tuning runs the kernel several times on the caller's real state;
                # every in-place argument must be put back before the final launch.
                restore_value=["x_ptr", "m_ptr", "model_in_ptr", "steps_ptr", "norm_ptr", "finished_ptr"],
            )(_nag_step_kernel))
        return _TUNED[0]


def nag_step_triton(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
                    max_steps, steps, norm, finished, guided_channels, freeze_finished=False):
    """Fused Triton NAG-GD step for the listed slots; updates state in place."""
    # -- check --
    A, K = _check_args(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
                       max_steps, steps, norm, finished, guided_channels)
    tensors = dict(out=out, x=x, m=m, model_in=model_in, slot_ids=slot_ids, rows=rows,
                   weights=weights, eta=eta, mu=mu, threshold=threshold, max_steps=max_steps,
                   steps=steps, norm=norm, finished=finished)
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"nag_step_triton: {name} must be contiguous")
    if not HAS_TRITON:
        raise RuntimeError("nag_step_triton: triton is not installed")
    if not out.is_cuda and not _INTERPRETING:
        raise ValueError(f"nag_step_triton: tensors are on {out.device}; the compiled kernel needs CUDA "
                         "(set TRITON_INTERPRET=1 before importing triton to run it on CPU)")
    if _interpreter_mismatch():
        raise RuntimeError("nag_step_triton: TRITON_INTERPRET changed after `import triton`; "
                           "set it before triton is first imported")
    if A == 0:
        return None

    # -- allocate (nothing: every output is written in place) --
    _, C, H, W = out.shape
    N = C * H * W
    GN = guided_channels * H * W
    # A bool tensor holds one byte per element; its uint8 view is written in place.
    flags = finished.view(torch.uint8) if finished.dtype == torch.bool else finished

    # -- launch --
    args = (out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold, max_steps, steps, norm, flags)
    consts = dict(N=N, GN=GN, K=K, FREEZE_FINISHED=bool(freeze_finished))
    if _INTERPRETING:
        # One block size, no tuning (the autotuner benchmarks on a GPU).
        _nag_step_kernel[(A,)](*args, **consts, BLOCK=_INTERPRET_BLOCK, num_warps=4)
    else:
        with torch.cuda.device(out.device):
            _tuned_kernel()[(A,)](*args, **consts)
    return None


# --------------------------------------------------------------------------- #
# Dispatcher
# --------------------------------------------------------------------------- #
def nag_step(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
             max_steps, steps, norm, finished, guided_channels, freeze_finished=False):
    """NAG-GD step: the fused Triton kernel for CUDA tensors (or when
    EQM_FORCE_TRITON=1, e.g. tests under TRITON_INTERPRET=1), else the torch
    reference. Updates state in place, returns None."""
    use_triton = out.is_cuda or os.environ.get("EQM_FORCE_TRITON") == "1"
    # CUDA without triton installed still works, eagerly; forcing it does not.
    if use_triton and (HAS_TRITON or os.environ.get("EQM_FORCE_TRITON") == "1"):
        return nag_step_triton(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
                               max_steps, steps, norm, finished, guided_channels, freeze_finished)
    return nag_step_reference(out, x, m, model_in, slot_ids, rows, weights, eta, mu, threshold,
                              max_steps, steps, norm, finished, guided_channels, freeze_finished)
