"""OpenAI's Files and Batch API for ``/v1/images/generations`` bodies (``service.runs.batches`` keeps them moving).

``POST /v1/files`` (multipart ``file`` + ``purpose=batch``), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``POST /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``. Every input line is checked
when the batch is created, exactly as the synchronous route checks a body; a line that fails goes to the
batch's error file with the reason, the others run as low-priority jobs.
"""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import ApiState, get_state, require_api_key
from service.api.schemas import error_responses
from service.api.openai_images import ImageGenerationRequest, _build_spec, _check_size, _revised
from service.runs import batches as store
from service.runs.plan import DEFAULT_PRIORITY

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])

ENDPOINT = "/v1/images/generations"
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_BATCH_LINES = 50_000           # OpenAI's own limit per batch


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(..., max_length=100)
    endpoint: str = Field(..., max_length=100)
    completion_window: str = Field("24h", max_length=10)
    metadata: dict[str, str] | None = None


def _root(request: Request):
    return request.app.state.runs.root


@router.post("/v1/files", summary="Upload a batch input file (JSONL, purpose 'batch')",
             responses=error_responses(400, 401, 413))
async def create_file(request: Request) -> dict:
    form = await request.form(max_part_size=MAX_FILE_BYTES)
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose != "batch":
        raise HTTPException(400, f"purpose {purpose!r} is not supported: this server takes purpose 'batch' files")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "no file: send the JSONL as the multipart field 'file'")
    data = await upload.read()
    if len(data) > MAX_FILE_BYTES:
        raise HTTPException(413, f"the file has {len(data)} bytes, more than {MAX_FILE_BYTES}")
    return await run_in_threadpool(store.save_file, _root(request), data, upload.filename or "batch.jsonl", "batch")


@router.get("/v1/files/{file_id}", summary="A file's description", responses=error_responses(401, 404))
async def get_file(request: Request, file_id: str) -> dict:
    return _file(request, file_id)[0]


@router.get("/v1/files/{file_id}/content", response_class=FileResponse, summary="A file's bytes",
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "the file's bytes (JSON Lines for batch input and output files)"},
                       **error_responses(401, 404)})
async def file_content(request: Request, file_id: str) -> FileResponse:
    meta, path = _file(request, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=meta["filename"])


def _file(request: Request, file_id: str):
    found = store.load_file(_root(request), file_id)
    if found is None:
        raise HTTPException(404, f"no file {file_id!r}")
    return found


@router.post("/v1/batches", summary="Create a batch of /v1/images/generations requests",
             responses=error_responses(400, 401, 404))
async def create_batch(request: Request, body: BatchRequest, state: ApiState = Depends(get_state)) -> dict:
    if body.endpoint != ENDPOINT:
        raise HTTPException(400, f"endpoint {body.endpoint!r} is not batched here: use {ENDPOINT!r}")
    if body.completion_window != "24h":
        raise HTTPException(400, "completion_window must be '24h'")
    meta, path = _file(request, body.input_file_id)
    if meta["purpose"] != "batch":
        raise HTTPException(400, f"file {body.input_file_id} has purpose {meta['purpose']!r}, not 'batch'")
    texts = [t for t in path.read_text(errors="replace").splitlines() if t.strip()]
    if not texts:
        raise HTTPException(400, f"file {body.input_file_id} holds no request lines")
    if len(texts) > MAX_BATCH_LINES:
        raise HTTPException(400, f"file {body.input_file_id} has {len(texts)} lines, more than {MAX_BATCH_LINES}")
    lines = [_line(k, text, state) for k, text in enumerate(texts)]
    customs = [line["custom_id"] for line in lines]
    if len(set(customs)) != len(customs):
        raise HTTPException(400, "custom_id values must be unique within a batch")
    record = await run_in_threadpool(store.new_batch, _root(request), input_file_id=body.input_file_id,
                                     endpoint=body.endpoint, completion_window=body.completion_window,
                                     metadata=body.metadata, lines=lines)
    return store.public_batch(record)


@router.get("/v1/batches/{batch_id}", summary="A batch's status, counts and output file",
            responses=error_responses(401, 404))
async def get_batch(request: Request, batch_id: str) -> dict:
    record = store.load_batch(_root(request), batch_id)
    if record is None:
        raise HTTPException(404, f"no batch {batch_id!r}")
    return store.public_batch(record)


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch (finished lines stay in its output)",
             responses=error_responses(401, 404))
async def cancel_batch(request: Request, batch_id: str) -> dict:
    record = await run_in_threadpool(request.app.state.runs.batches.cancel, batch_id)
    if record is None:
        raise HTTPException(404, f"no batch {batch_id!r}")
    return store.public_batch(record)


def _line(k: int, text: str, state: ApiState) -> dict:
    """One input line -> ``{"custom_id", "spec", "revised", "size"}``, or ``{"custom_id", "error"}``."""
    try:
        item = json.loads(text)
    except ValueError as exc:
        return {"custom_id": f"line-{k + 1}", "error": _err(f"line {k + 1} is not JSON ({exc})", None)}
    custom_id = item.get("custom_id") if isinstance(item, dict) else None
    if not isinstance(custom_id, str) or not custom_id:
        return {"custom_id": f"line-{k + 1}", "error": _err(f"line {k + 1} has no custom_id", "custom_id")}
    if item.get("url") != ENDPOINT or item.get("method", "POST") != "POST":
        return {"custom_id": custom_id, "error": _err(f"url must be POST {ENDPOINT}", "url")}
    raw = item.get("body")
    try:
        body = ImageGenerationRequest.model_validate(raw)
        model = state.pick_model(body.model)
        _check_size(body.size, model)
        if body.output_format is not None:
            body = body.model_copy(update={"format": body.output_format})
        spec, labels = _build_spec(body, body.prompt, model, state, "generate", body.weights)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        return {"custom_id": custom_id, "error": _err(f"body.{param}: {first.get('msg')}", param)}
    except RequestValidationError as exc:
        first = exc.errors()[0]
        return {"custom_id": custom_id, "error": _err(str(first.get("msg")), str(first.get("loc", ("",))[-1]))}
    except StarletteHTTPException as exc:
        return {"custom_id": custom_id, "error": _err(str(exc.detail), None)}
    if "priority" not in raw:
        spec.priority = DEFAULT_PRIORITY            # results later: behind interactive requests
    size = f"{model.image_size}x{model.image_size}"
    return {"custom_id": custom_id, "spec": spec.to_json(), "revised": _revised(labels, model), "size": size}


def _err(message: str, param: str | None) -> dict:
    return {"message": message, "param": param, "code": "invalid_request"}
