"""A real `eqm serve` (uvicorn + a CPU worker with the bundled digits model) on a given Redis, for client tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def service_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(settings)
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = START_TIMEOUT_S,
               status: int = 200) -> None:
    """Until ``url`` answers ``status``; fails the test (with the log's tail) if the process exits first."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer {status} within {timeout_s}s:\n{log.read_text()[-3000:]}")


def serve(redis_url: str, port: int, log: Path, **settings: str) -> subprocess.Popen:
    """`eqm serve` on ``port`` with the digits model on the CPU (one torch thread), ready to take jobs."""
    env = service_env(**{"EQM_REDIS_URL": redis_url, "EQM_CHECKPOINT": "digits", "EQM_HEARTBEAT_S": "0.5", **settings})
    proc = start(["serve", "--port", str(port), "--device", "cpu", "--threads", "1", "--log-level", "warning"],
                 env, log)
    wait_ready(f"http://127.0.0.1:{port}/readyz", proc, log)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
    """Send ``sig`` and wait; a process that does not stop in time is killed and the test fails."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{' '.join(map(str, proc.args[-3:]))}: did not stop within {timeout_s:g}s of signal {sig}")
    return proc.returncode
