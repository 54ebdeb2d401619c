"""Hostile clients under load, on loopback against a real `eqm api` (embedded Redis, no worker needed).

1. Slow bodies: ``--clients`` connections each send a JSON body one byte every 2 s (never tripping the
   30 s per-chunk timeout) for ``--window-s``. Side by side, alternating rounds: the API with the whole-body
   deadline (``EQM_BODY_DEADLINE_S``) and the same API with it pushed out of reach (the per-chunk timeout
   alone: how the API behaved before the deadline existed). Measured: how long the server held each
   connection, how many it still held at the end, and the latency of ``/healthz`` on a fresh connection
   meanwhile.
2. Poisoned webhooks: ``--poison`` deliveries whose URL carries a control character (records written before
   submissions were checked) are put due in Redis; the API's dispatcher runs for ``--poison-s``. Side by
   side: the same API idle for as long with no delivery. Measured: the API's CPU seconds, deliveries left,
   log lines written; and submissions with such a URL (all must get 422).

``python bench/bench_hostile.py`` writes the "## Hostile clients" section of ``bench/RESULTS.md``;
``--quick`` runs a small version (no file written).
"""
from __future__ import annotations

import argparse
import base64
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import machine_load, median_range, publish  # noqa: E402
from service.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from service.webhooks import HookKeys  # noqa: E402

TITLE = "## Hostile clients"
BYTE_EVERY_S = 2.0
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def start_api(redis_url: str, log: Path, **env: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    full.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", EQM_REDIS_URL=redis_url, EQM_CHECKPOINT="digits", **env)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port", str(port)], env=full,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the API did not start:\n" + log.read_text()[-2000:])


def stop_api(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- slow bodies --------------------------------------------------------------------------------

def slow_client(port: int, window_s: float, held: list, index: int) -> None:
    """Send a body one byte every 2 s until the server closes the connection or the window ends."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    start = time.monotonic()
    sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 5000\r\n\r\n{")
    sock.settimeout(BYTE_EVERY_S)
    closed_at = None
    while time.monotonic() - start < window_s:
        try:
            data = sock.recv(65536)
            if not data or data.startswith(b"HTTP/1.1 "):
                closed_at = time.monotonic() - start
                break
        except socket.timeout:
            pass
        try:
            sock.sendall(b" ")
        except OSError:
            closed_at = time.monotonic() - start
            break
    sock.close()
    held[index] = closed_at


def slow_bodies(redis_url: str, folder: Path, deadline_s: float, clients: int, window_s: float) -> dict:
    proc, port = start_api(redis_url, folder / "slow.log", EQM_BODY_DEADLINE_S=str(deadline_s),
                           EQM_BODY_TIMEOUT_S="30")
    try:
        held: list = [None] * clients
        threads = [threading.Thread(target=slow_client, args=(port, window_s, held, k)) for k in range(clients)]
        for t in threads:
            t.start()
        probes = []
        end = time.monotonic() + window_s
        while time.monotonic() < end:
            t0 = time.perf_counter()
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            probes.append(time.perf_counter() - t0)
            time.sleep(0.5)
        for t in threads:
            t.join()
    finally:
        stop_api(proc)
    lifetimes = [window_s if h is None else h for h in held]
    return {"held_s": statistics.median(lifetimes), "still_open": sum(h is None for h in held),
            "healthz_ms": 1000 * statistics.median(probes)}


# -- poisoned webhooks --------------------------------------------------------------------------

def poisoned_webhooks(redis_url: str, folder: Path, poison: int, seconds: float) -> dict:
    r = redis.Redis.from_url(redis_url)
    keys = HookKeys("poison")
    out = {}
    for case in ("clean", "poisoned"):
        r.flushall()
        log = folder / f"webhooks-{case}.log"
        proc, port = start_api(redis_url, log, EQM_KEY_PREFIX="poison", EQM_WEBHOOK_SECRET=SECRET,
                               EQM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1:9000")
        try:
            time.sleep(1.0)                            # the dispatcher takes its lease
            if case == "poisoned":
                for k in range(poison):
                    mid = f"poison{k}-1-0"
                    r.hset(keys.msg(mid), mapping={"url": f"http://127.0.0.1:9000/poison{k}\n", "body": "{}",
                                                   "first": time.time(), "attempts": 0})
                    r.zadd(keys.due, {mid: 0})
            lines_before = len(log.read_text().splitlines())
            cpu0 = cpu_seconds(proc.pid)
            time.sleep(seconds)
            cpu = cpu_seconds(proc.pid) - cpu0
            left = r.zcard(keys.due)
            lines = len(log.read_text().splitlines()) - lines_before
            refused = sum(httpx.post(f"http://127.0.0.1:{port}/v1/generations", timeout=10,
                                     json={"labels": [1], "webhook": f"http://127.0.0.1:9000/p{k}\r\n"}).status_code == 422
                          for k in range(20))
        finally:
            stop_api(proc)
        out[case] = {"cpu_s": cpu, "left": left, "log_lines": lines, "refused": refused}
    r.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small run; writes nothing")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--deadline-s", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--poison", type=int, default=200)
    p.add_argument("--poison-s", type=float, default=10.0)
    args = p.parse_args()
    if args.quick:
        args.clients, args.window_s, args.deadline_s, args.rounds, args.poison, args.poison_s = 5, 8, 3, 1, 20, 3
    load = machine_load()
    server = EmbeddedRedis().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            runs = {"deadline": [], "none": []}
            for _ in range(args.rounds):                     # alternating, side by side
                runs["deadline"].append(slow_bodies(server.url, folder, args.deadline_s, args.clients, args.window_s))
                runs["none"].append(slow_bodies(server.url, folder, 1e9, args.clients, args.window_s))
            hooks = poisoned_webhooks(server.url, folder, args.poison, args.poison_s)
    finally:
        server.stop()

    def col(name: str, key: str, fmt: str) -> str:
        return median_range([r[key] for r in runs[name]], fmt)

    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    text = f"""{TITLE}

`python bench/bench_hostile.py` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {day}; {load}.
`eqm api` on loopback with an embedded Redis; medians of {args.rounds} alternating rounds [min-max].

Slow bodies: {args.clients} connections each sending a JSON body one byte every {BYTE_EVERY_S:.0f} s for {args.window_s:.0f} s
(the 30 s per-chunk timeout never fires). Baseline: the same API with the whole-body deadline out of reach
(the per-chunk timeout alone, as before the deadline existed).

| | connection held (median s) | still held at {args.window_s:.0f} s | `/healthz` meanwhile (ms) |
|---|---|---|---|
| whole-body deadline {args.deadline_s:.0f} s | {col("deadline", "held_s", "{:.1f}")} | {col("deadline", "still_open", "{:.0f}")} of {args.clients} | {col("deadline", "healthz_ms", "{:.1f}")} |
| per-chunk timeout only (baseline) | {col("none", "held_s", "{:.1f}")} | {col("none", "still_open", "{:.0f}")} of {args.clients} | {col("none", "healthz_ms", "{:.1f}")} |

Poisoned webhooks: {args.poison} due deliveries whose URL ends in a newline (records from before submissions
were checked), the API's dispatcher running for {args.poison_s:.0f} s; baseline: the same API idle as long with none.

| | API CPU (s) over {args.poison_s:.0f} s | deliveries left | log lines | poisoned submissions refused (422) |
|---|---|---|---|---|
| {args.poison} poisoned deliveries | {hooks["poisoned"]["cpu_s"]:.2f} | {hooks["poisoned"]["left"]} | {hooks["poisoned"]["log_lines"]} | {hooks["poisoned"]["refused"]} of 20 |
| none (baseline) | {hooks["clean"]["cpu_s"]:.2f} | {hooks["clean"]["left"]} | {hooks["clean"]["log_lines"]} | {hooks["clean"]["refused"]} of 20 |

Every poisoned delivery is gone after its first attempt (dropped as final, no retry, no traceback; the log
lines are everything the API wrote in the window); before, each was retried with a traceback at every pass
for the message's lifetime (hours).
"""
    publish(TITLE, text, write=not args.quick)


if __name__ == "__main__":
    main()
