"""Compile the fused NAG-GD step for real GPU targets on a machine without a GPU; report registers and spills.

The kernel goes through the launcher's own specialisation (Triton's binder on tensors of the dtypes and
shapes the sampler passes, ``_pack_args`` for signature, constants and alignment attributes) and
Triton's compiler with ``GPUTarget("cuda", arch, 32)``, down to a cubin by the ptxas Triton ships, whose
report (``-v``) gives registers and spills. The
cases are what the sampler launches on CUDA: the plan's K (``MAX_ROWS_PER_SAMPLE``, always, see
``SlotBatch._step_subset``) and K=2 (a direct CFG launch), int32 indices, ``freeze_finished``, every
block size the autotuner keeps for the latent size after ``_prune_configs``, model dtypes float32 and
bfloat16, at the bundled digits shape (1x8x8) and the EqM-XL/2 latent (4x32x32, 3 guided channels).

Needs a compiling Triton: run it without ``TRITON_INTERPRET=1`` (``python -m kernels.compile_check``
prints one JSON line per case). The binder and ``_pack_args`` are Triton internals (this was written
against 3.9, the version the suite runs); the kernel module itself imports and runs from 3.2 on
(``tests/test_triton_versions.py``).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

SHAPES = {"digits": (1, 8, 8, 1), "EqM-XL/2": (4, 32, 32, 3)}    # (C, H, W, guided channels)
ARCHS = (80, 90)                                                  # A100, H100/H200
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TargetCase:
    shape: str
    arch: int
    dtype: str
    K: int
    BLOCK: int
    num_warps: int


@dataclass
class TargetResult(TargetCase):
    registers: int
    spill_stores: int
    spill_loads: int
    cubin_bytes: int


def cases() -> list[TargetCase]:
    """Every (shape, arch, dtype, K, autotuner config) the sampler's CUDA launches can compile."""
    import triton

    import kernels.nag_step as ns
    from kernels.nag_step import MAX_ROWS_PER_SAMPLE
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ns._CONFIGS_GPU]
    out = []
    for shape, (c, h, w, _) in SHAPES.items():
        kept = ns._prune_configs(configs, {}, N=c * h * w)
        for arch in ARCHS:
            for dtype in DTYPES:
                for k in (2, MAX_ROWS_PER_SAMPLE):
                    out += [TargetCase(shape, arch, dtype, k, cfg.kwargs["BLOCK"], cfg.num_warps) for cfg in kept]
    return out


def _launch_args(case: TargetCase):
    """Tensors of the dtypes the sampler passes (their shapes do not enter the specialisation)."""
    c, h, w, g = SHAPES[case.shape]
    s, r, dt = 4, 8, DTYPES[case.dtype]
    f32, i32 = dict(dtype=torch.float32), dict(dtype=torch.int32)
    args = (torch.zeros(r, c, h, w, dtype=dt), torch.zeros(s, c, h, w, **f32), torch.zeros(s, c, h, w, **f32),
            torch.zeros(r, c, h, w, dtype=dt), torch.zeros(s, **i32), torch.zeros(s, case.K, **i32),
            torch.zeros(s, case.K, **f32), torch.zeros(s, **f32), torch.zeros(s, **f32), torch.zeros(s, **f32),
            torch.zeros(s, **i32), torch.zeros(s, **i32), torch.zeros(s, **f32), torch.zeros(s, dtype=torch.int8))
    consts = dict(N=c * h * w, GN=g * h * w, K=case.K, FREEZE_FINISHED=True, BLOCK=case.BLOCK,
                  num_warps=case.num_warps)
    return args, consts


def compile_case(case: TargetCase) -> TargetResult:
    """Compile one case for ``sm_<arch>``; registers and spills as ptxas reports them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    import kernels.nag_step as ns
    if ns._INTERPRETING:
        raise RuntimeError("compile_check: TRITON_INTERPRET=1 is set; the kernel would not be compiled")
    jit = ns._nag_step_kernel
    target = GPUTarget("cuda", case.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    args, consts = _launch_args(case)
    bound, specialization, options = binder(*args, **consts)
    options, signature, constexprs, attrs = jit._pack_args(backend, consts, bound, specialization, options)
    # Triton's own ptxas run reports registers and spills (its flags, its ptxas); a private cache
    # directory makes it run rather than load an earlier cubin.
    log = io.StringIO()
    saved = (triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir = True, tmp
        try:
            kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        finally:
            triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir = saved
    report = log.getvalue()
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not regs or not spills:
        raise RuntimeError(f"compile_check: no register report from ptxas for {case}: {report.strip()[-500:]}")
    return TargetResult(**asdict(case), registers=int(regs.group(1)), spill_stores=int(spills.group(1)),
                        spill_loads=int(spills.group(2)), cubin_bytes=len(kernel.asm["cubin"]))


def main(argv=None) -> int:
    for case in cases():
        print(json.dumps(asdict(compile_case(case))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
