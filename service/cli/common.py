"""What several commands share: their common flags, .npy files written atomically, a progress display,
the --inpaint/--mask inputs. No command lives here."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


# Model dtypes by the names the flag accepts (torch attribute names, plus short forms).
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def load_npy(path: str, what: str):
    import numpy as np

    from service.cli import UsageError
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except (ValueError, OSError) as exc:
        raise UsageError(f"{what} {path}: not a .npy array ({exc})") from None
    if arr.ndim != 4 or arr.dtype.kind != "f":
        raise UsageError(f"{what} {path}: expected float32 of shape (n, C, H, W), got {arr.dtype} {arr.shape}")
    return arr.astype(np.float32)


def inpaint_inputs(args: argparse.Namespace, codec, size: int):
    """(pixels (H, W, C) uint8, regenerate (H, W) bool, (known, keep) on the latent grid) of --inpaint/--mask."""
    from models.inpaint import MaskError, latent_hold, mask_from_png
    from service.cli import UsageError
    from service.images import ImageError, decode_image
    channels = getattr(codec, "channels", 3) if codec.name == "identity" else 3
    try:
        pixels = decode_image(Path(args.inpaint).read_bytes(), size, channels)
        regenerate = mask_from_png(Path(args.mask).read_bytes(), size)
    except OSError as exc:
        raise UsageError(f"--inpaint/--mask: {exc}") from None
    except (ImageError, MaskError) as exc:
        raise UsageError(f"--inpaint/--mask: {exc}") from None
    return pixels, regenerate, latent_hold(codec, pixels, regenerate)


def save_npy(path: str, arr) -> None:
    """Atomic write: nothing half-written is left behind."""
    import numpy as np

    tmp = Path(path + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


PROGRESS_EVERY_S = 5.0      # without a terminal: one line this often


def progress_bar(total: int, stream=None):
    """A progress callback ``(step, total)``: a bar on a terminal, else a line every ``PROGRESS_EVERY_S``
    (logs and CI show long runs moving) and one at the end."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, desc="sampling", unit="step", leave=False, file=stream)

        def update(step: int, _total: int) -> None:
            bar.n = step
            bar.refresh()
            if step >= _total:
                bar.close()
        return update
    started = last = time.monotonic()

    def report(step: int, _total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S or (step >= _total and now - started >= PROGRESS_EVERY_S):
            last = now
            print(f"sampling: step {step}/{_total} ({now - started:.0f} s)", file=stream, flush=True)
    return report


def parse_model_flags(items: list[str]) -> dict[str, str]:
    from service.cli import UsageError
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--model-flag {item!r}: expected NAME=VALUE (e.g. num_heads=4)")
        out[name.strip()] = value.strip()
    return out


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default EQM_HOST, 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port to listen on (default EQM_PORT, 8000)")
    p.add_argument("--checkpoint", action="append",
                   help="bundled model name or checkpoint file; repeat it to serve several models, the first being "
                        "the default (default EQM_CHECKPOINTS, else EQM_CHECKPOINT, else 'digits')")
    p.add_argument("--vae", help="SD-VAE folder for latent models (default EQM_VAE)")
    p.add_argument("--ebm", choices=["none", "dot", "l2", "mean"],
                   help="energy form of a checkpoint that records none (official --ebm; default EQM_EBM)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace):
    from service.settings import Settings
    overrides = {name: getattr(args, name, None) for name in ("host", "port", "checkpoint", "vae", "redis_url", "ebm")}
    overrides.update(checkpoint_overrides(getattr(args, "checkpoint", None)))
    return Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})


def checkpoint_overrides(flags: list[str] | str | None) -> dict:
    """Settings from repeated ``--checkpoint`` flags: one is ``checkpoint``; several are ``checkpoints``."""
    if not flags:
        return {}
    if isinstance(flags, str):
        flags = [flags]
    return {"checkpoint": flags[0], "checkpoints": tuple(flags) if len(flags) > 1 else ()}


def check_checkpoint_file(args: argparse.Namespace, settings) -> None:
    """A served checkpoint that is neither a bundled name nor a file: one line naming where the name came from
    (the flag or the variable the user set), before torch and the API's modules load (seconds)."""
    for checkpoint in settings.served_checkpoints:
        _check_one_checkpoint(args, settings, checkpoint)


def _check_one_checkpoint(args: argparse.Namespace, settings, checkpoint: str) -> None:
    from models import BUNDLED, resolve_checkpoint
    from service.cli import UsageError
    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        return
    source = f"--checkpoint {checkpoint}" if getattr(args, "checkpoint", None) else \
        f"EQM_CHECKPOINTS={','.join(settings.checkpoints)}" if settings.checkpoints else f"EQM_CHECKPOINT={checkpoint}"
    if checkpoint in BUNDLED:
        raise UsageError(f"{source}: the bundled file {path} is missing (it ships with the package: reinstall it)")
    what = "a folder, not a checkpoint file" if path.is_dir() else "no such file"
    raise UsageError(f"{source}: {what} (a checkpoint file: .pt or .safetensors, or a bundled model: "
                     f"{', '.join(BUNDLED)})")
