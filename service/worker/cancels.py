"""The worker's cancel listener: a thread on ``P:cancel`` feeds a queue the loop drains before every step."""
from __future__ import annotations

import logging
import queue

import redis

log = logging.getLogger("eqm.worker")


class CancelListening:
    # -- cancellation ---------------------------------------------------------------------------
    def _drain_cancels(self) -> None:
        while True:
            try:
                job_id, why = self._lost.get_nowait()
            except queue.Empty:
                break
            if job_id in self.engine.job_ids() and job_id not in self._dropped:
                self._drop(job_id, ack=why != "lost", why=why)
        while True:
            try:
                job_id = self._cancels.get_nowait()
            except queue.Empty:
                return
            if self.engine.cancel(job_id):
                log.info("job %s: cancel requested", job_id)

    def _listen_cancels(self) -> None:
        while not self._closed.is_set():
            try:
                pubsub = self.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.cancel_channel)
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=0.2)
                    if msg and msg.get("type") == "message":
                        self._cancels.put(msg["data"].decode())
                pubsub.close()
            except redis.RedisError as exc:
                log.warning("cancel listener: %s; reconnecting", exc)
                self._closed.wait(0.5)
