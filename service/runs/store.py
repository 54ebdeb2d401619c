"""The results store: a directory shared by the API and every worker (``EQM_RESULTS_DIR``; a volume in
compose, a PersistentVolumeClaim in Kubernetes). Images of sampling runs go here, never through Redis.

Layout (one folder per run)::

    runs/<id>/run.json             the run record (JSON, replaced atomically); survives a Redis that lost everything
    runs/<id>/shards/<k>.npz       shard k: ``images`` uint8 (n, H, W, C), ``labels``, ``seeds``, ``steps``,
                                   ``grad_norms``, ``energies`` (NaN where the model has none)
    runs/<id>/shards/<k>.sha256    SHA-256 of the shard file; written after it: a shard counts as done only
                                   when both exist and agree
    runs/<id>/samples.npz          the ADM evaluator's file: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 labels
    runs/<id>/stats.npz            per image: ``steps``, ``grad_norms``, ``energies``, ``seeds``, ``labels``

Invariants: a shard is written once (a second delivery of the same shard finds it and writes nothing);
every file is written under a temporary name and renamed, so a reader never sees half a file; the
``.npz`` files are streamed shard by shard, so assembling 50,000 ImageNet images needs one shard in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np

SHARD_ARRAYS = ("images", "labels", "seeds", "steps", "grad_norms", "energies")
STATS_ARRAYS = ("steps", "grad_norms", "energies", "seeds", "labels")
SAMPLES_FILE, STATS_FILE = "samples.npz", "stats.npz"


class StoreError(Exception):
    """The results store cannot take the run (one line: what is wrong and what to do)."""


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eqm" / "results"


def root_of(configured: str) -> Path:
    return Path(configured) if configured else default_root()


def check_writable(root: Path) -> None:
    """Create the store if needed and prove a file can be written there."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"the results directory {root} is not writable ({exc.strerror or exc}); "
                         "set EQM_RESULTS_DIR to a writable folder shared by the API and the workers") from None


def free_bytes(root: Path) -> int:
    return shutil.disk_usage(root).free


def estimate_bytes(num_samples: int, height: int, width: int, channels: int) -> int:
    """Disk a run needs: its shards, the assembled ADM file (3 channels) and the statistics, plus 5%."""
    shards = num_samples * (height * width * channels + 40)
    samples = num_samples * (height * width * 3 + 8)
    stats = num_samples * 40
    return int(1.05 * (shards + samples + stats)) + 1_000_000


# -- run records ------------------------------------------------------------------------------------
def run_dir(root: Path, run_id: str) -> Path:
    return root / "runs" / run_id


def save_run(root: Path, record: dict) -> None:
    folder = run_dir(root, record["id"])
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "run.json", json.dumps(record).encode())


def load_run(root: Path, run_id: str) -> dict | None:
    if not run_id.isalnum():               # ids are hex: nothing else may reach the file system
        return None
    try:
        return json.loads((run_dir(root, run_id) / "run.json").read_bytes())
    except (OSError, ValueError):
        return None


def run_ids(root: Path) -> list[str]:
    folder = root / "runs"
    return sorted(p.name for p in folder.iterdir() if (p / "run.json").is_file()) if folder.is_dir() else []


# -- shards -----------------------------------------------------------------------------------------
def shard_path(root: Path, run_id: str, index: int) -> Path:
    return run_dir(root, run_id) / "shards" / f"{index:05d}.npz"


def shard_relpath(run_id: str, index: int) -> str:
    """What a shard job carries: the path inside the store (each process mounts the store where it likes)."""
    return f"runs/{run_id}/shards/{index:05d}.npz"


def _digest_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


def shard_done(path: Path) -> bool:
    return path.is_file() and _digest_path(path).is_file()


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write shard arrays once; False when the shard was already there (a second delivery)."""
    if shard_done(path):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: arrays[k] for k in SHARD_ARRAYS})
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _atomic_write(_digest_path(path), digest.encode())
    return True


def read_shard(path: Path) -> dict[str, np.ndarray] | None:
    """The shard's arrays, or None when it is missing or its checksum does not match (then it is removed,
    so the shard runs again)."""
    if not shard_done(path):
        return None
    if _sha256(path) != _digest_path(path).read_text().strip():
        path.unlink(missing_ok=True)
        _digest_path(path).unlink(missing_ok=True)
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in SHARD_ARRAYS}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- assembly ---------------------------------------------------------------------------------------
def adm_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) images in the ADM evaluator's 3 channels: a grey channel repeated, RGB as it is."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def assemble(root: Path, record: dict) -> tuple[Path, Path]:
    """Stream the shards, in order, into ``samples.npz`` (ADM layout) and ``stats.npz``. Grey images get
    their one channel repeated three times: the evaluator reads ``N x H x W x 3`` and its Inception network
    takes RGB. Raises ``StoreError`` when a shard is missing or damaged (it is removed to run again)."""
    folder = run_dir(root, record["id"])
    n, (h, w) = record["num_samples"], record["image_size"]
    shards = record["shards"]
    stats: dict[str, list[np.ndarray]] = {k: [] for k in STATS_ARRAYS}
    out, tmp = folder / SAMPLES_FILE, folder / f".{SAMPLES_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {"descr": "|u1", "fortran_order": False,
                                                              "shape": (n, h, w, 3)})
                for shard in shards:
                    arrays = read_shard(shard_path(root, record["id"], shard["index"]))
                    if arrays is None:
                        raise StoreError(f"shard {shard['index']} of run {record['id']} is missing or damaged")
                    images = arrays["images"]
                    if images.shape != (shard["count"], h, w, images.shape[-1]):
                        raise StoreError(f"shard {shard['index']} holds images of shape {images.shape}")
                    member.write(np.ascontiguousarray(adm_rgb(images), dtype=np.uint8).tobytes())
                    for k in STATS_ARRAYS:
                        stats[k].append(arrays[k])
            labels = np.concatenate(stats["labels"]).astype(np.int64)
            with z.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    stats_path = folder / STATS_FILE
    buf_tmp = folder / f".{STATS_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        with open(buf_tmp, "wb") as f:
            np.savez(f, **{k: np.concatenate(v) for k, v in stats.items()})
        os.replace(buf_tmp, stats_path)
    finally:
        buf_tmp.unlink(missing_ok=True)
    return out, stats_path
