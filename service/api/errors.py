"""The one-line ``message`` of a validation error: what was wrong and what to send instead.

Shared by the native routes (``message`` beside FastAPI's ``detail`` list) and the OpenAI-shaped
routes (``error.message``). Beyond "field: reason" it says what a client most often got wrong:
a body without ``Content-Type: application/json``, JSON sent to a route that takes a multipart form,
and an unknown field (the nearest valid name, else the list of them).
"""
from __future__ import annotations

import difflib
import inspect
import typing
from typing import Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

JSON_HEADER_HINT = "body: expected a JSON object; send it with the header 'Content-Type: application/json'"
# Names other image APIs and the official scripts use for this service's fields.
ALIASES = {"steps": "max_steps", "num_steps": "max_steps", "num_sampling_steps": "max_steps",
           "num_inference_steps": "max_steps", "cfg": "guidance_scale", "cfg_scale": "guidance_scale",
           "eta": "step_size", "lr": "step_size", "threshold": "grad_norm_threshold", "label": "labels",
           "class_labels": "labels", "num_images": "n", "batch_size": "n", "momentum": "mu"}


def body_fields(request: Request) -> list[str]:
    """Field names of the JSON body model of the route that answered ``request`` (empty if unknown)."""
    endpoint = request.scope.get("endpoint")
    if endpoint is None:
        return []
    try:
        hints = typing.get_type_hints(endpoint)
    except Exception:                    # a handler whose annotations cannot be resolved: no list, no harm
        return []
    for name in inspect.signature(endpoint).parameters:
        annotation = hints.get(name)
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            return sorted(annotation.model_fields)
    return []


def unknown_field_message(name: str, fields: list[str]) -> str:
    if not fields:
        return f"unknown field {name!r}"
    guess = ALIASES.get(name) if ALIASES.get(name) in fields else None
    guess = guess or next(iter(difflib.get_close_matches(name, fields, n=1, cutoff=0.6)), None)
    if guess:
        return f"unknown field {name!r}: did you mean {guess!r}? (the fields are: {', '.join(fields)})"
    return f"unknown field {name!r}; the fields are: {', '.join(fields)}"


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def validation_message(request: Request, errors: list[dict]) -> tuple[str, str | None]:
    """``(one-line message, the field it is about or None)`` for the first error of a request."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    kind = str(first.get("type", ""))
    content_type = _content_type(request)
    field = ".".join(p for p in loc if p not in ("body", "query", "header")) or None
    if kind == "json_invalid":
        return "body: not valid JSON (JSON decode error)", None
    if loc == ["body"] and kind in ("model_attributes_type", "dict_type", "model_type") and "json" not in content_type:
        return JSON_HEADER_HINT, None
    if kind == "missing" and loc[:1] == ["body"] and content_type != "multipart/form-data" and \
            any(e.get("type") == "missing" and list(e.get("loc", ()))[-1:] == ["image"] for e in errors):
        return (f"body: {request.url.path} takes a multipart form (the image as a file field 'image', options as "
                f"form fields, e.g. curl -F image=@digit.png -F label=3), not "
                f"{'JSON' if 'json' in content_type else content_type or 'a body without Content-Type'}"), "image"
    if kind == "extra_forbidden" and len(loc) == 2 and loc[0] == "body":
        return f"body.{loc[1]}: {unknown_field_message(loc[1], body_fields(request))}", loc[1]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(loc)
    return (f"{where}: {msg}" if where else msg), field


# FastAPI answers a JSON body that the decoder raised anything but a JSON decode error on (nesting deeper
# than the parser's recursion limit, an integer of more digits than Python converts, bytes that are not
# UTF-8) with a bare 400; it is malformed JSON like any other, so it gets the 422 and a reason.
FASTAPI_BODY_ERROR = "There was an error parsing the body"


def malformed_json_reason(cause: BaseException | None) -> str:
    """Why the body is not usable JSON, in a few words, from the error the decoder raised (FastAPI chains
    it to its 400; the body itself is gone by then: reading it again would wait for bytes that never come)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "a number with too many digits"
    return "not valid JSON"


def field_error(loc: Sequence[str | int], msg: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own validation errors."""
    return RequestValidationError([{"loc": tuple(loc), "msg": msg, "type": "value_error"}])
