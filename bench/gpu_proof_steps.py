"""The steps of bench/gpu_proof.py, one function each; each returns a JSON-able dict.

Every step takes ``dry``: on a machine without a GPU it imports what the step uses and builds what it
can without running CUDA (models on the meta device, test selections collected), so CI proves that
the script the first GPU run depends on imports and parses.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
XL2_IMAGES = (16, 64, 256)
CFG_SCALE = 1.5
UPDATES = 249                          # the paper's 250-step setting runs 249 updates


def _digits():
    from models import resolve_checkpoint
    from models import load_model
    return resolve_checkpoint("digits"), load_model


def _random_xl2(device: str, dtype: torch.dtype, seed: int = 0):
    """EqM-XL/2 with random weights (DiT's init zeroes the output layers: every weight moved by 0.02 N(0, 1))."""
    from models.eqm.network import EqM, config_for
    torch.manual_seed(seed)
    model = EqM(config_for("EqM-XL/2")).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(dtype).eval().requires_grad_(False)


def step_env(dry: bool) -> dict:
    """Device, driver and library versions; the C compiler Triton's launcher needs."""
    import triton
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "cc": shutil.which("cc") or shutil.which("gcc"), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}"})
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    if not dry and not info["gpus"]:
        raise RuntimeError("no CUDA device visible to torch")
    if not dry and not info["cc"]:
        raise RuntimeError("no C compiler on PATH: Triton cannot build its launcher (install gcc)")
    return info


def step_gpu_tests(dry: bool) -> dict:
    """The ``gpu``-marked tests and the sampler-through-the-kernel test, on the GPU."""
    sel = ["tests/test_nag_step.py", "tests/test_sampler.py", "tests/test_gpu_targets.py"]
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sel, "-k",
            "cuda or gpu or triton_kernel or compiles or spill"]
    if dry:
        args.append("--collect-only")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or dry}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    if proc.returncode != 0:
        raise RuntimeError(f"pytest failed: {proc.stdout[-1500:]}{proc.stderr[-800:]}")
    return {"command": " ".join(args[1:]), "summary": tail}


def step_kernel(dry: bool) -> dict:
    """The compiled fused step against the torch reference on CUDA: fp32 / bf16 rows, K = 1..3 and the plan's 8."""
    import kernels.nag_step as ns
    sys.path.insert(0, str(ROOT / "tests"))
    from test_nag_step import assert_state_close, make_case
    cases = [(k, dt) for dt in (torch.float32, torch.bfloat16) for k in (1, 2, 3, 8)]
    if dry:
        make_case(4, 32, 32, 2, G=3, out_dtype=torch.bfloat16, mi_dtype=torch.bfloat16, S=4, A=3, seed=0)
        return {"cases": len(cases), "dry": True}
    checked = []
    for k, dt in cases:
        st, g = make_case(4, 32, 32, k, G=3 if k > 1 else 4, out_dtype=dt, mi_dtype=dt, S=64, A=48, seed=k)
        gpu = {n: v.cuda() for n, v in st.items()}
        ref = {n: v.clone() for n, v in gpu.items()}
        ns.nag_step_reference(**ref, guided_channels=g)
        ns.nag_step_triton(**gpu, guided_channels=g)
        torch.cuda.synchronize()
        assert_state_close({n: v.cpu() for n, v in gpu.items()}, {n: v.cpu() for n, v in ref.items()})
        checked.append(f"K={k} {str(dt).replace('torch.', '')}")
    return {"matches_reference": checked}


def official_loop(model, z, y, null_label, steps, eta, mu, cfg_scale):
    """The official NAG-GD sampling loop restated (CFG on 3 of 4 channels, batch [cond; null])."""
    n = z.shape[0]
    x, yy = torch.cat([z, z]), torch.cat([y, torch.full_like(y, null_label)])
    m = torch.zeros_like(x)
    for _ in range(steps):
        out = model(x + eta * mu * m, yy)[:, :4].float()
        cond, uncond = out[:n], out[n:]
        guided = uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3])
        half = torch.cat([guided, cond[:, 3:]], dim=1)
        out = torch.cat([half, half])
        m = out
        x = x + eta * out
    return x[:n]


def _tiny_agreement() -> float:
    """The engine's sampler and the restated official loop on a tiny 4-channel model on the CPU, both in
    float32: they must agree to rounding, or the comparison on the GPU would compare different things."""
    from models.eqm.network import EqM, EqMConfig
    from models.sampler import Condition, SamplerParams, noise_for_seed, sample
    cfg = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                    num_heads=1, num_classes=10)
    torch.manual_seed(0)
    model = EqM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().requires_grad_(False)
    x0 = torch.stack([noise_for_seed(i, (4, 8, 8)) for i in range(4)])
    labels = torch.arange(4)
    params = SamplerParams(step_size=0.05, mu=0.3, max_steps=6)
    got = sample(model, x0, [Condition((int(c),), cfg_scale=CFG_SCALE) for c in labels], params,
                 null_label=cfg.null_label, guided_channels=3).latents
    with torch.no_grad():
        want = official_loop(model, x0, labels, cfg.null_label, 6, 0.05, 0.3, CFG_SCALE)
    diff = float((got - want).norm() / want.norm())
    if diff > 1e-5:
        raise RuntimeError(f"engine sampler and restated official loop disagree on the CPU: {diff:.1e}")
    return diff


def step_engine(dry: bool, images=XL2_IMAGES, save=None) -> dict:
    """EqM-XL/2 (random weights), 249 updates with CFG: the engine's sampler (bf16, fused step) against the
    official loop restated (fp32 + TF32 eager), the same batch, side by side in this run."""
    from models.sampler import Condition, SamplerParams, noise_for_seed, sample
    from service.runner import configure_device_math
    if dry:
        with torch.device("meta"):
            _random_xl2("meta", torch.bfloat16)
        return {"images": list(images), "dry": True, "tiny_model_relative_difference": _tiny_agreement()}
    configure_device_math("cuda", torch.float32)
    results = {}
    params = SamplerParams(step_size=0.0017, mu=0.3, max_steps=UPDATES)
    for n in images:
        x0 = torch.stack([noise_for_seed(i, (4, 32, 32)) for i in range(n)])
        labels = torch.arange(n) % 1000
        row = {}
        for name in ("engine_bf16", "official_fp32_tf32"):
            dtype = torch.bfloat16 if name == "engine_bf16" else torch.float32
            model = _random_xl2("cuda", dtype)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "engine_bf16":
                conds = [Condition((int(c),), cfg_scale=CFG_SCALE) for c in labels]
                out = sample(model, x0.cuda(), conds, params, null_label=1000, guided_channels=3).latents
            else:
                with torch.no_grad():
                    out = official_loop(model, x0.cuda(), labels.cuda(), 1000, UPDATES, 0.0017, 0.3, CFG_SCALE).cpu()
            torch.cuda.synchronize()
            row[name] = {"seconds": time.perf_counter() - t0, "images_per_s": n / (time.perf_counter() - t0)}
            row[name + "_latents"] = out
            del model
            torch.cuda.empty_cache()
        a, b = row.pop("engine_bf16_latents"), row.pop("official_fp32_tf32_latents")
        row["speedup"] = row["official_fp32_tf32"]["seconds"] / row["engine_bf16"]["seconds"]
        row["relative_difference"] = float((a - b).norm() / b.norm())
        results[str(n)] = row
        if save is not None:
            save(results)              # kept if a later, larger batch runs past the step's time limit
    return results


def _hash_digits(device: str) -> dict:
    """Digits model on ``device`` in its own process: 64 images with CFG, sha256 of latents and pixels."""
    from models.codecs import IdentityCodec
    from models.device import claim_device
    from models.sampler import Condition, SamplerParams, noise_for_seed, sample
    claim_device(device)
    path, load_model = _digits()
    loaded = load_model(path, device=device, dtype=torch.float32)
    cfg = loaded.spec.config
    x0 = torch.stack([noise_for_seed(i, (cfg.in_channels, cfg.input_size, cfg.input_size)) for i in range(64)])
    conds = [Condition((i % 10,), cfg_scale=2.0) for i in range(64)]
    res = sample(loaded.model, x0.to(device), conds, SamplerParams(step_size=0.05, max_steps=40),
                 null_label=cfg.null_label, guided_channels=loaded.spec.guided_channels)
    pixels = IdentityCodec(cfg.in_channels, cfg.input_size).decode_tensor(res.latents)
    return {"latents_sha256": hashlib.sha256(res.latents.numpy().tobytes()).hexdigest(),
            "pixels_sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()}


def step_two_gpus(dry: bool) -> dict:
    """Two worker-like processes on cuda:0 and cuda:1, the same requests: byte-identical images."""
    if dry:
        return {"dry": True, "cpu": _hash_digits("cpu")}
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): needs two"}
    hashes = {}
    for device in ("cuda:0", "cuda:1"):
        code = f"import json, sys; sys.path.insert(0, 'bench'); import gpu_proof_steps as s; print(json.dumps(s._hash_digits({device!r})))"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{device}: {proc.stderr[-1000:]}")
        import json
        hashes[device] = json.loads(proc.stdout.strip().splitlines()[-1])
    if hashes["cuda:0"] != hashes["cuda:1"]:
        raise RuntimeError(f"images differ between cuda:0 and cuda:1: {hashes}")
    return {"byte_identical": True, **hashes["cuda:0"]}


def step_modes(dry: bool) -> dict:
    """Eager, torch.compile and CUDA-graph forwards on the digits model: warm-up time per mode, latents
    against eager, and the out-of-memory fallback (chunked forward) under each mode."""
    from models.codecs import IdentityCodec
    from service.runner import COMPILE_MODES, ModelRunner
    path, load_model = _digits()
    device = "cpu" if dry else "cuda:0"
    loaded = load_model(path, device=device, dtype=torch.float32)
    cfg = loaded.spec.config
    out, ref = ({"dry": True}, None) if dry else ({}, None)
    for mode in ("off",) if dry else COMPILE_MODES:
        runner = ModelRunner.from_loaded(loaded, IdentityCodec(cfg.in_channels, cfg.input_size), capacity=16,
                                         max_rows=48, compile_mode=mode)
        warm = runner.warmup()
        x = torch.randn(48, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        y = torch.arange(48, device=device) % cfg.num_classes
        full = runner._forward(x, y).float().clone()
        runner.forward_limit = 8                       # as after an out-of-memory error: chunks of 8 rows
        chunked = runner._forward(x, y).float().clone()
        ref = full if ref is None else ref
        out[mode] = {"warmup_s": warm, "buckets": len(runner.batch.row_buckets),
                     "max_diff_vs_eager": float((full - ref).abs().max()),
                     "chunked_max_diff": float((chunked - full).abs().max())}
        if out[mode]["chunked_max_diff"] > 1e-3:
            raise RuntimeError(f"{mode}: chunked forward differs from the full one by {out[mode]['chunked_max_diff']}")
    return out


# name -> (function, time limit in seconds), in the order they run: the engine comparison, the longest,
# runs last and keeps the batches it finished.
STEPS = {"env": (step_env, 60), "kernel": (step_kernel, 90), "gpu_tests": (step_gpu_tests, 150),
         "modes": (step_modes, 150), "two_gpus": (step_two_gpus, 90), "engine": (step_engine, 330)}
