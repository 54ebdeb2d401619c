"""Webhook deliveries to a healthy receiver while another receiver hangs; and retries after 410 Gone.

Each run, in a child process on the code under test (``PYTHONPATH``): an embedded redis-server, the
webhook dispatcher of that code (``service.webhooks.WebhookDispatcher``, as the API runs it), and three
receivers on loopback: one that accepts requests and never answers (the sender's 5 s timeout ends
each attempt), one that answers 204 at once, and one that answers 410 Gone.

1. One job with the 410 receiver's webhook ends; measured: how many times that receiver is called in
   the next ``--gone-s`` seconds (1 is right: 410 means stop).
2. ``--hung`` jobs with the hanging receiver's webhook end (their final event becomes a due delivery);
   1 s later ``--healthy`` jobs with the healthy receiver's webhook end, one every 0.1 s. Measured: for
   each healthy job, the time from its final event to its delivery.

The dispatcher runs from this checkout (``after``) and from ``--baseline`` (``before``, a git ref
exported to a temporary folder), alternating; medians [range] over ``--repeats``.

Usage:
  python bench/bench_webhook_isolation.py [--hung 30] [--healthy 10] [--repeats 3] [--baseline REF] [--no-write]
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTION_TITLE = "## Webhooks: a hung receiver beside a healthy one"


def _receiver(status: int | None, arrivals: dict, release: threading.Event) -> ThreadingHTTPServer:
    """A loopback receiver: answers ``status`` at once, or (None) never, until ``release``; records
    ``arrivals[job id] = [monotonic times]``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            arrivals.setdefault(body["data"]["id"], []).append(time.monotonic())
            if status is None:
                release.wait(60)
                return
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def child(hung_jobs: int, healthy_jobs: int, gone_s: float) -> dict:
    """One run on the code found on ``sys.path``; returns the measurements."""
    import redis

    from service.embedded_redis import EmbeddedRedis
    from service.jobstore import ImageSpec, JobSpec, JobStore
    from service.settings import Settings
    from service.webhooks import WebhookDispatcher, WebhookTarget, register_webhook

    emb = EmbeddedRedis().start()
    r = redis.Redis.from_url(emb.url)
    store = JobStore(r)
    release = threading.Event()
    hung_arrivals, healthy_arrivals, gone_arrivals = {}, {}, {}
    hung = _receiver(None, hung_arrivals, release)
    healthy = _receiver(204, healthy_arrivals, release)
    gone = _receiver(410, gone_arrivals, release)
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    settings = Settings(webhook_secret=secret, webhook_allowed_hosts=("127.0.0.1",), webhook_max_backoff_s=60)

    def job(server: ThreadingHTTPServer) -> str:
        spec = JobSpec(kind="generate", model="digits", images=[ImageSpec(seed=0, labels=[1])])
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        register_webhook(r, "eqm", spec.id, WebhookTarget(url, ("completed",)), "http://api", 600)
        store.submit(spec)
        return spec.id

    dispatcher = WebhookDispatcher(r, settings).start()
    try:
        gone_job = job(gone)
        store.cancel(gone_job)
        time.sleep(gone_s)
        gone_calls = len(gone_arrivals.get(gone_job, []))
        for _ in range(hung_jobs):
            store.cancel(job(hung))
        waiting = [job(healthy) for _ in range(healthy_jobs)]
        time.sleep(1.0)
        ended = {}
        for job_id in waiting:
            store.cancel(job_id)
            ended[job_id] = time.monotonic()
            time.sleep(0.1)
        end = time.monotonic() + 60
        while len(healthy_arrivals) < healthy_jobs and time.monotonic() < end:
            time.sleep(0.05)
        delays = [healthy_arrivals[j][0] - ended[j] for j in waiting if j in healthy_arrivals]
    finally:
        release.set()
        dispatcher.stop()
        for server in (hung, healthy, gone):
            server.shutdown()
            server.server_close()
        r.close()
        emb.stop()
    return {"delays": delays, "delivered": len(delays), "gone_calls": gone_calls,
            "hung_attempts": sum(len(v) for v in hung_arrivals.values())}


def export(ref: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def one_run(src: Path, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--hung", str(args.hung),
                          "--healthy", str(args.healthy), "--gone-s", str(args.gone_s)],
                         cwd=src, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hung", type=int, default=30)
    ap.add_argument("--healthy", type=int, default=10)
    ap.add_argument("--gone-s", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default="")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.hung, args.healthy, args.gone_s)))
        return 0
    sys.path.insert(0, str(ROOT))
    from bench import results
    load = results.machine_load()
    started = datetime.datetime.now(datetime.timezone.utc)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="eqm-webhooks-") as tmp:
        versions = {"after": ROOT}
        if args.baseline:
            versions = {"before": export(args.baseline, Path(tmp) / "before"), "after": ROOT}
        for rep in range(args.repeats):
            for name in (list(versions) if rep % 2 == 0 else list(reversed(versions))):
                res = one_run(versions[name], args)
                runs.setdefault(name, []).append(res)
                d = res["delays"] or [float("nan")]
                print(f"{name:6s} healthy delivered {res['delivered']}/{args.healthy}, delay median "
                      f"{statistics.median(d):.2f} s max {max(d):.2f} s; 410 receiver called {res['gone_calls']} "
                      f"times in {args.gone_s:.0f} s; hung receiver attempts {res['hung_attempts']}", flush=True)
    results.publish(SECTION_TITLE, section(args, runs, load, started), write=not args.no_write)
    return 0


def section(args, runs, load, started) -> str:
    mr = results_median_range()
    rows = []
    for name, rs in runs.items():
        med = [statistics.median(r["delays"]) for r in rs if r["delays"]]
        worst = [max(r["delays"]) for r in rs if r["delays"]]
        rows.append(f"| {name} | {mr(med, '{:.2f}')} | {mr(worst, '{:.2f}')} | "
                    f"{sum(r['delivered'] for r in rs)}/{args.healthy * len(rs)} | "
                    f"{mr([r['gone_calls'] for r in rs], '{:.0f}')} |")
    cmd = "python bench/bench_webhook_isolation.py" + "".join(
        f" --{k} {v}" for k, v in (("hung", args.hung), ("healthy", args.healthy), ("repeats", args.repeats),
                                   ("baseline", args.baseline)) if v)
    return f"""{SECTION_TITLE}

{started:%Y-%m-%d %H:%M} UTC, CPU ({platform.machine()}, {os.cpu_count()} cores; {load}: the machine was shared
with other work), loopback; `{cmd}`. The API's webhook dispatcher with an embedded
redis-server. First one job whose receiver answers 410 Gone ends: calls that receiver got in
{args.gone_s:.0f} s. Then {args.hung} jobs whose receiver accepts and never answers (each attempt ends at the 5 s
timeout) end; 1 s later {args.healthy} jobs of a healthy receiver (204 at once) end, one every 0.1 s. Delay: from a
healthy job's final event to its delivery. `before`: the dispatcher at `{args.baseline or '-'}` (8 jobs in flight
over all receivers, retries of every non-2xx); `after`: this code (32 in flight, at most 2 per
receiver; 410 ends the hook). Medians [range] of {args.repeats} alternating runs.

| dispatcher | healthy delivery delay, median (s) | worst (s) | healthy delivered | calls after 410 |
|---|---:|---:|---:|---:|
""" + "\n".join(rows) + "\n"


def results_median_range():
    from bench.results import median_range
    return median_range


if __name__ == "__main__":
    raise SystemExit(main())
