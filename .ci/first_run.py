"""The README's first command, as a new user runs it: `eqm serve` in an environment that has only the
base install, then one image through the API, then Ctrl-C. Standard library only (nothing but the base
install is there). Exit 0 when all of it worked; otherwise the log of `eqm serve` and exit 1.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(message: str, log_path: str) -> int:
    with open(log_path, encoding="utf-8", errors="replace") as f:
        print(f.read()[-6000:], file=sys.stderr)
    print(f"first run: FAILED: {message}", file=sys.stderr)
    return 1


def main() -> int:
    eqm = shutil.which("eqm")
    if eqm is None:
        print("first run: FAILED: no `eqm` command on PATH after the README's install", file=sys.stderr)
        return 1
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    started = time.monotonic()
    proc = subprocess.Popen([eqm, "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                return fail(f"eqm serve exited with status {proc.returncode} before it was ready", log.name)
            if time.monotonic() - started > READY_TIMEOUT_S:
                return fail(f"eqm serve was not ready after {READY_TIMEOUT_S} s", log.name)
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        ready_s = time.monotonic() - started
        request = urllib.request.Request(f"{base}/v1/generations?wait=true", method="POST",
                                         data=json.dumps({"labels": [3], "seed": 0}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            job = json.load(resp)
        if job.get("status") != "done":
            return fail(f"the job did not finish: {job}", log.name)
        with urllib.request.urlopen(job["links"]["images"][0], timeout=30) as resp:
            png = resp.read()
            content_type = resp.headers.get("Content-Type")
        if content_type != "image/png" or not png.startswith(b"\x89PNG\r\n\x1a\n"):
            return fail(f"image 0 is not a PNG ({content_type}, {len(png)} bytes)", log.name)
    except OSError as exc:
        return fail(f"request failed: {exc}", log.name)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return fail(f"eqm serve did not stop within {STOP_TIMEOUT_S} s of Ctrl-C", log.name)
    if proc.returncode != 0:
        return fail(f"eqm serve exited with status {proc.returncode} after Ctrl-C", log.name)
    with open(log.name, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if "Traceback" in text:
        return fail("a traceback in the log of eqm serve", log.name)
    print(f"first run: eqm serve ready in {ready_s:.1f} s, one image generated ({len(png)} bytes PNG), "
          "stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
