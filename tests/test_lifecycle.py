"""Children that die with their parent: the parent-death signal is asked for only from the main thread."""
from __future__ import annotations

import sys
import threading
import time

import pytest
import redis

from service.embedded_redis import EmbeddedRedis
from service.lifecycle import die_with_parent

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


@linux_only
def test_parent_death_signal_is_asked_for_from_the_main_thread_only():
    assert die_with_parent() is not None
    seen = []
    worker = threading.Thread(target=lambda: seen.append(die_with_parent()))
    worker.start()
    worker.join()
    assert seen == [None]


def test_a_redis_started_from_a_thread_outlives_that_thread():
    """The kernel ties the parent-death signal to the starting thread: a Redis started (or restarted)
    from a helper thread must not die when that thread ends."""
    holder: list[EmbeddedRedis] = []
    starter = threading.Thread(target=lambda: holder.append(EmbeddedRedis().start()))
    starter.start()
    starter.join()
    server = holder[0]
    try:
        time.sleep(0.5)                                   # a signal sent at the thread's exit has landed by now
        assert server.proc.poll() is None, "redis-server died with the thread that started it"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
    finally:
        server.stop()
