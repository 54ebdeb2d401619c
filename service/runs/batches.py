"""OpenAI's Batch API over the queue: a JSONL file of ``/v1/images/generations`` requests in, a JSONL file of
their responses out (``POST /v1/files`` purpose ``batch``, ``POST /v1/batches``, ``GET /v1/batches/{id}``).

Files and batches live in the results store (``files/<id>``, ``batches/<id>/``), not in Redis. The API
validates every line when the batch is created and keeps, per line, the job it becomes (``requests.jsonl``);
lines that are not valid requests go straight to the error file. ``BatchKeeper.tick`` (run by the run
keeper's thread) queues up to ``window`` jobs of a batch at low priority, writes each finished line's
response to ``batches/<id>/lines/<k>.json`` and, when every line has one, joins them in line order into
the output and error files. A job lost with Redis is queued again, as a run's shards are.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

from service.jobstore import JobSpec, JobStore
from service.runs.store import _atomic_write

FILE_PURPOSES = ("batch", "batch_output")
MAX_LINE_FAILURES = 3


def file_dir(root: Path) -> Path:
    return root / "files"


def save_file(root: Path, data: bytes, filename: str, purpose: str) -> dict:
    file_id = "file-" + uuid.uuid4().hex
    meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
    folder = file_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / file_id, data)
    _atomic_write(folder / f"{file_id}.json", json.dumps(meta).encode())
    return meta


def load_file(root: Path, file_id: str) -> tuple[dict, Path] | None:
    if not file_id.startswith("file-") or not file_id[5:].isalnum():
        return None
    meta = file_dir(root) / f"{file_id}.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_bytes()), file_dir(root) / file_id


def batch_dir(root: Path, batch_id: str) -> Path:
    return root / "batches" / batch_id


def load_batch(root: Path, batch_id: str) -> dict | None:
    if not batch_id.startswith("batch_") or not batch_id[6:].isalnum():
        return None
    try:
        return json.loads((batch_dir(root, batch_id) / "batch.json").read_bytes())
    except (OSError, ValueError):
        return None


def save_batch(root: Path, record: dict) -> None:
    folder = batch_dir(root, record["id"])
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "batch.json", json.dumps(record).encode())


def new_batch(root: Path, *, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
              lines: list[dict]) -> dict:
    """``lines``: per input line ``{"custom_id", "spec": JobSpec JSON, "revised", "size"}`` or
    ``{"custom_id", "error": {"message", "param", "code"}}``."""
    batch_id = "batch_" + uuid.uuid4().hex
    now = int(time.time())
    record = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
              "input_file_id": input_file_id, "completion_window": completion_window, "status": "in_progress",
              "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": now,
              "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
              "expired_at": None, "cancelling_at": None, "cancelled_at": None,
              "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "metadata": metadata,
              "jobs": [None] * len(lines), "attempts": [0] * len(lines)}
    folder = batch_dir(root, batch_id)
    (folder / "lines").mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "requests.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())
    for k, line in enumerate(lines):
        if "error" in line:
            _write_line(folder, k, line["custom_id"], 400, {"error": {"type": "invalid_request_error", **line["error"]}},
                        request_id="")
    save_batch(root, record)
    return record


def public_batch(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("jobs", "attempts")}


def _write_line(folder: Path, k: int, custom_id: str, status: int, body: dict, request_id: str) -> None:
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}
    _atomic_write(folder / "lines" / f"{k:07d}.json", json.dumps(line).encode())


class BatchKeeper:
    def __init__(self, root: Path, store: JobStore, window: int = 16):
        self.root, self.store, self.window = root, store, window

    def batch_ids(self) -> list[str]:
        folder = self.root / "batches"
        return sorted(p.name for p in folder.iterdir() if (p / "batch.json").is_file()) if folder.is_dir() else []

    def tick(self) -> None:
        for batch_id in self.batch_ids():
            record = load_batch(self.root, batch_id)
            if record is not None and record["status"] in ("in_progress", "cancelling"):
                self.advance(record)

    def advance(self, record: dict) -> None:
        folder = batch_dir(self.root, record["id"])
        lines = [json.loads(t) for t in (folder / "requests.jsonl").read_text().splitlines()]
        inflight = 0
        for k, line in enumerate(lines):
            if (folder / "lines" / f"{k:07d}.json").is_file() or record["jobs"][k] is None:
                continue
            job = self.store.get(record["jobs"][k])
            status = job["status"] if job else None
            if status in ("queued", "running"):
                inflight += 1
            elif status == "done":
                self._done_line(folder, k, line, job)
            elif status == "failed" and record["attempts"][k] >= MAX_LINE_FAILURES:
                _write_line(folder, k, line["custom_id"], 500,
                            {"error": {"message": job.get("error") or "the job failed", "type": "server_error",
                                       "param": None, "code": "job_failed"}}, request_id=job["id"])
            elif status == "cancelled" and record["status"] == "cancelling":
                _write_line(folder, k, line["custom_id"], 499,
                            {"error": {"message": "the batch was cancelled", "type": "cancelled", "param": None,
                                       "code": "batch_cancelled"}}, request_id=job["id"])
            else:
                record["jobs"][k] = None               # gone (Redis lost it), failed or cancelled elsewhere: again
        if record["status"] == "in_progress":
            for k, line in enumerate(lines):
                if inflight >= self.window:
                    break
                if record["jobs"][k] is None and "spec" in line and not (folder / "lines" / f"{k:07d}.json").is_file():
                    spec = JobSpec.from_json(line["spec"])
                    record["attempts"][k] += 1
                    spec.id = f"{record['id'][6:]}l{k:07d}a{record['attempts'][k]}"
                    spec.submitted = time.time()
                    self.store.submit(spec)
                    record["jobs"][k] = spec.id
                    inflight += 1
        written = sorted((folder / "lines").glob("*.json"))
        if record["status"] == "cancelling" and inflight == 0:
            record.update(status="cancelled", cancelled_at=int(time.time()))
            self._join(record, folder, written)
        elif len(written) == len(lines):
            record.update(status="completed", finalizing_at=int(time.time()), completed_at=int(time.time()))
            self._join(record, folder, written)
        else:
            ok = sum(1 for p in written if json.loads(p.read_bytes())["response"]["status_code"] == 200)
            record["request_counts"].update(completed=ok, failed=len(written) - ok)
        save_batch(self.root, record)

    def _done_line(self, folder: Path, k: int, line: dict, job: dict) -> None:
        data = []
        for i in range(len(job["spec"]["images"])):
            raw = self.store.image(job["id"], i)
            data.append({"b64_json": base64.b64encode(raw).decode() if raw else None,
                         "revised_prompt": line["revised"]})
        body = {"created": int(job["created"] or time.time()), "data": data,
                "output_format": job["spec"]["format"], "size": line["size"]}
        _write_line(folder, k, line["custom_id"], 200, body, request_id=job["id"])

    def _join(self, record: dict, folder: Path, written: list[Path]) -> None:
        """The output file (status 200 lines) and the error file (the rest), in input order."""
        good, bad = [], []
        for path in written:
            text = path.read_text()
            (good if json.loads(text)["response"]["status_code"] == 200 else bad).append(text + "\n")
        record["request_counts"].update(completed=len(good), failed=len(bad))
        if good:
            record["output_file_id"] = save_file(self.root, "".join(good).encode(), f"{record['id']}_output.jsonl",
                                                 "batch_output")["id"]
        if bad:
            record["error_file_id"] = save_file(self.root, "".join(bad).encode(), f"{record['id']}_error.jsonl",
                                                "batch_output")["id"]

    def cancel(self, batch_id: str) -> dict | None:
        record = load_batch(self.root, batch_id)
        if record is None or record["status"] != "in_progress":
            return record
        record.update(status="cancelling", cancelling_at=int(time.time()))
        for job_id in record["jobs"]:
            if job_id:
                self.store.cancel(job_id)
        save_batch(self.root, record)
        return record
