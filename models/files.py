"""Checkpoint files of every family: reading one safely, writing one atomically, one-line errors.

Nothing is unpickled beyond tensors and the ``argparse.Namespace`` the official trainers store
(``torch.load(weights_only=True)``). Every failure is a ``CheckpointError`` whose message says what
was wrong; the CLI prints it without a traceback. Torch and safetensors load on first use, so that
``models.BUNDLED`` (defined here) costs a command's ``--help`` nothing.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Models that ship inside the package, loadable by name (e.g. ``--checkpoint digits``).
BUNDLED = {"digits": WEIGHTS_DIR / "digits.safetensors",
           "digits-e": WEIGHTS_DIR / "digits-e.safetensors",    # EqM-E (dot energy), same architecture
           "em-digits": WEIGHTS_DIR / "em-digits.safetensors"}  # Energy Matching (models/energy_matching/digits.py)


def resolve_checkpoint(name_or_path: str) -> Path:
    """A bundled model's name, or a path, -> the file to load."""
    return BUNDLED.get(name_or_path, Path(name_or_path))


class CheckpointError(Exception):
    """A checkpoint could not be read or does not fit the requested model (one-line message)."""


def _torch_load(path: Path) -> object:
    import torch
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on bad input; each becomes one line
        if "Weights only load failed" in str(exc) and "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: refuses to unpickle objects other than tensors ({_first_unsafe(exc)})") from None
        with open(path, "rb") as fh:
            is_zip = fh.read(2) == b"PK"     # torch.save writes a zip archive since torch 1.6
        if is_zip or isinstance(exc, (EOFError, zipfile.BadZipFile)):
            raise CheckpointError(f"{path}: file is truncated or corrupt ({_first_line(exc)})") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:160] if lines else type(exc).__name__


def _first_unsafe(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "Unsupported global" in line:
            return line.strip().split("Unsupported global:")[-1].strip().split(" ")[0].strip("GLOBAL ")
    return "unsupported object"


def read_checkpoint_file(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """The raw contents of a checkpoint file of any family: (a safetensors file's tensors and metadata) or
    (a ``torch.save``'d dict, {}); one-line errors for a file that is missing, empty or unreadable."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, expected a dict of tensors)")
    return obj, {}


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, tensors unread."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None


def load_strict(network: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *, network_name: str,
                expects: str, hint: str = "") -> None:
    """Load ``state`` into ``network`` with ``strict=True``, after checking every key and shape so that a
    mismatch is one line: ``network_name`` names what the file should match, ``expects`` says who expects
    a shape, ``hint`` what to do."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} keys (e.g. {missing[0]})"] if missing else []) + \
                ([f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})"] if unexpected else [])
        raise CheckpointError(f"{source}: does not match {network_name}: {'; '.join(parts)}{hint}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"{expects} {tuple(tensor.shape)}{hint}")
    network.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Tensors plus metadata to ``path``, atomically (a tmp file renamed over it): never half a file."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)     # a weights file is data to share, whatever the writer's umask-less temp mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
