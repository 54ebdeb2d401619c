"""The served OpenAPI schema, finished for client generators.

FastAPI's defaults name operations after function, path and method (``get_image_v1_jobs__job_id__images__index__get``)
and multipart bodies ``Body_<that>``; they document a field-error 422 on the OpenAI-compatible routes,
which answer 400 in OpenAI's shape instead; they leave out the statuses every route can answer through
shared code (408 from the body deadlines, 507 from a full Redis); and they describe the bearer key
even on a server that has no keys (lock icons and "Authorize" in ``/docs``). ``finish_openapi`` fixes these once, when the schema is first built:
operation ids are the handlers' names (``get_image``), bodies are ``<Operation>Form``.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

OPENAI_PREFIX = "/v1/images/"
_BODY_TIMEOUT = ("the request body did not arrive in time (EQM_BODY_TIMEOUT_S per chunk, EQM_BODY_DEADLINE_S "
                 "whole); send it at once")
_STORE_FULL = "the job store (Redis) is out of memory; retry later"


def operation_id(route: APIRoute) -> str:
    """The handler's name: unique across the app (checked when the schema is built)."""
    return route.name


def finish_openapi(app: FastAPI, api_keys_required: bool) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            _finish(schema, api_keys_required)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _finish(schema: dict, api_keys_required: bool) -> None:
    ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise RuntimeError(f"operation ids used twice: {sorted(duplicates)}; rename the handlers")
    schemas = schema.get("components", {}).get("schemas", {})
    renames = {name: "".join(part.capitalize() for part in name[len("Body_"):].split("_")) + "Form"
               for name in schemas if name.startswith("Body_")}
    for old, new in renames.items():
        schemas[new] = schemas.pop(old)
        schemas[new]["title"] = new
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    openai_ref = {"$ref": "#/components/schemas/OpenAIError"}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            _rename_refs(op, renames)
            responses = op["responses"]
            ref = openai_ref if path.startswith(OPENAI_PREFIX) else error_ref
            if path.startswith(OPENAI_PREFIX):
                responses.pop("422", None)              # these routes answer 400 in OpenAI's shape
            if method == "post" and "requestBody" in op:
                responses.setdefault("408", {"description": _BODY_TIMEOUT,
                                             "content": {"application/json": {"schema": ref}}})
            if "429" in responses:                      # the routes that write a job
                responses.setdefault("507", {"description": _STORE_FULL,
                                             "content": {"application/json": {"schema": ref}}})
            if not api_keys_required:
                op.pop("security", None)                # no keys on this server: nothing to authorize
    if not api_keys_required:
        # Without keys the bearer scheme would only draw lock icons and an "Authorize" button in /docs.
        components = schema.get("components", {})
        components.pop("securitySchemes", None)


def _rename_refs(node, renames: dict[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in renames:
            node["$ref"] = "#/components/schemas/" + renames[ref.rsplit("/", 1)[-1]]
        for value in node.values():
            _rename_refs(value, renames)
    elif isinstance(node, list):
        for value in node:
            _rename_refs(value, renames)
