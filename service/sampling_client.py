"""Client of ``/v1/sampling-runs``: submit a run, show its progress, download its ``.npz`` (resuming a broken
download with a range request). ``eqm sample --server URL --num-samples N --npz out.npz`` is this.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx

POLL_S = 1.0
CHUNK = 1 << 20


class RunError(Exception):
    """The server refused the run, or it failed (one line, the server's reason)."""


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    return str(body.get("message") or body.get("detail") or body)


class SamplingRunClient:
    def __init__(self, server: str, api_key: str | None = None, timeout_s: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout_s)

    def submit(self, **body) -> dict:
        resp = self.http.post("/v1/sampling-runs", json={k: v for k, v in body.items() if v is not None})
        if resp.status_code != 202:
            raise RunError(f"the server refused the run ({resp.status_code}): {_detail(resp)}")
        return resp.json()

    def status(self, run_id: str) -> dict:
        resp = self.http.get(f"/v1/sampling-runs/{run_id}")
        if resp.status_code != 200:
            raise RunError(f"run {run_id}: {resp.status_code} {_detail(resp)}")
        return resp.json()

    def wait(self, run_id: str, report=None) -> dict:
        """Poll until the run is final; ``report(status)`` after each poll."""
        while True:
            run = self.status(run_id)
            if report is not None:
                report(run)
            if run["status"] in ("done", "failed", "cancelled"):
                return run
            time.sleep(POLL_S)

    def download(self, run_id: str, out: str | Path, what: str = "npz") -> int:
        """Stream the run's file to ``out`` (``what``: npz or stats); a ``.part`` left by a broken download is
        continued with a range request. The file appears under its name only once complete."""
        out = Path(out)
        part = out.with_name(out.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self.http.stream("GET", f"/v1/sampling-runs/{run_id}/{what}", headers=headers, timeout=None) as resp:
            if resp.status_code == 416:             # the part is already whole
                pass
            elif resp.status_code not in (200, 206):
                resp.read()
                raise RunError(f"download of run {run_id}: {resp.status_code} {_detail(resp)}")
            else:
                mode = "ab" if resp.status_code == 206 else "wb"
                with open(part, mode) as f:
                    for chunk in resp.iter_bytes(CHUNK):
                        f.write(chunk)
        size = part.stat().st_size
        os.replace(part, out)
        return size


def sample_remote(server: str, num_samples: int, npz: str, *, labels="uniform", seed: int = 0,
                  stats_out: str | None = None, api_key: str | None = None, settings: dict | None = None,
                  stream=None) -> dict:
    """Submit, follow, download: the finished run's status (with its report)."""
    stream = stream or sys.stderr
    client = SamplingRunClient(server, api_key)
    run = client.submit(num_samples=num_samples, labels=labels, seed=seed, **(settings or {}))
    print(f"run {run['id']}: {num_samples} images in {run['progress']['shards_total']} shards", file=stream)
    run = client.wait(run["id"], _progress_printer(num_samples, stream))
    if run["status"] != "done":
        raise RunError(f"run {run['id']} ended {run['status']}: {run.get('error') or 'cancelled'}")
    size = client.download(run["id"], npz)
    print(f"wrote {npz}: {size} bytes (arr_0 uint8 images, arr_1 labels)", file=stream)
    if stats_out:
        client.download(run["id"], stats_out, "stats")
        print(f"wrote {stats_out}: per-image steps, final gradient norms, energies", file=stream)
    judge = (run.get("report") or {}).get("judge")
    if judge:
        print("quality: " + ", ".join(f"{k} {v}" for k, v in judge.items()), file=stream)
    elif run.get("report"):
        print(f"evaluate with the ADM evaluator: {run['report']['adm_evaluator']}", file=stream)
    return run


def _progress_printer(total: int, stream):
    """A bar on a terminal, else a line every few seconds."""
    if stream.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, desc="sampling run", unit="img", file=stream)

        def update(run: dict) -> None:
            bar.n = run["progress"]["done"]
            bar.set_postfix(eta=run["progress"]["eta_s"], failed=run["progress"]["shards_failed"])
            if run["status"] in ("done", "failed", "cancelled"):
                bar.close()
        return update
    last = [0.0]

    def line(run: dict) -> None:
        p, now = run["progress"], time.monotonic()
        if now - last[0] >= 5 or run["status"] != "running":
            last[0] = now
            rate = f", {p['images_per_second']} img/s, ETA {p['eta_s']} s" if p["images_per_second"] else ""
            print(f"sampling run: {p['done']}/{p['total']} images{rate}", file=stream, flush=True)
    return line
