"""Request and response bodies of the HTTP API (pydantic), with the examples the OpenAPI schema shows.

Every sampling option may be left out (or null): the served model's default is used, listed by
``GET /v1/models``. Unknown fields are an error, so a typo such as ``stepsize`` is reported, not ignored.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from service.classnames import MAX_LABEL_CHARS



def _label(value: object) -> int | str:
    too_long = isinstance(value, str) and len(value) > MAX_LABEL_CHARS
    if isinstance(value, bool) or not isinstance(value, (int, str)) or too_long:
        raise ValueError(f"a label is a class index (an integer) or a class name (a string of at most "
                         f"{MAX_LABEL_CHARS} characters)")
    return value


Label = Annotated[Union[int, str], PlainValidator(_label),
                  WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": MAX_LABEL_CHARS}]})]
LABEL_DOC = ("a class index (integer), or a class name as a string (case-insensitive; for ImageNet models "
             "also a WordNet id such as \"n02099601\" or any synonym); a decimal string is an index")
MAX_COMPOSITION_LABELS = 7       # the engine combines at most 8 model rows per image: 7 labels + the null row
SEED_MAX = 2**32 - 1
MAX_MODEL_CHARS = 200


class SamplingOptions(BaseModel):
    """Options shared by every kind of job."""

    # Strict: JSON ``true`` is not the integer 1, nor ``"3"`` the number 3 (forms, all text, relax this).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS, description="model to use; default: the served model",
                              examples=["digits"])
    # No schema maximum: the one limit is the server's per-job count (GET /v1/models), checked with one message.
    n: int = Field(1, ge=1, description="images to make (generations: per label); the total per job is "
                   "limited by the server (EQM_MAX_IMAGES_PER_JOB, default 64; GET /v1/models)", examples=[4])
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="seed of the first image; image k uses seed + k. "
                             "Default: random (the job status reports every image's seed)", examples=[0])
    guidance_scale: float | None = Field(None, ge=0, le=20, description="classifier-free guidance scale s: "
                                         "g = u + s * (c - u); 1 = plain conditional, 0 = unconditional",
                                         examples=[1.5])
    sampler: Literal["nag", "gd", "heun-sde"] | None = Field(
        None, description="nag = Nesterov-accelerated gradient descent (the paper's default), gd = plain gradient "
        "descent, heun-sde = the Euler-Heun SDE of Energy Matching models (step_size is its time step dt, "
        "max_steps counts Heun steps of two evaluations each)")
    step_size: float | None = Field(None, gt=0, le=1, description="gradient-descent step size eta",
                                    examples=[0.03])
    mu: float | None = Field(None, ge=0, lt=1, description="NAG look-ahead factor (ignored by gd)", examples=[0.3])
    max_steps: int | None = Field(None, ge=1, le=1000, description="most gradient updates per image",
                                  examples=[60])
    grad_norm_threshold: float | None = Field(None, ge=0, le=10_000, description="adaptive compute: an image stops "
                                              "once its gradient norm falls below this (0 = always run max_steps)",
                                              examples=[0.3])
    epsilon_max: float | None = Field(None, ge=0, le=10, description="heun-sde: temperature eps reached at t = 1 "
                                      "(0 = the deterministic Heun flow)", examples=[0.01])
    time_cutoff: float | None = Field(None, ge=0, le=1, description="heun-sde: eps is 0 before this time, then "
                                      "rises linearly to epsilon_max at t = 1", examples=[1.0])
    deadline_s: float | None = Field(None, gt=0, le=3600, description="seconds from submission; images still "
                                     "running then are returned as they are, flagged deadline_exceeded",
                                     examples=[30])
    format: Literal["png", "jpeg", "webp"] = Field("png", description="encoding of the output images")
    priority: int = Field(0, ge=0, le=9, description="higher runs first")
    webhook: str | None = Field(None, max_length=2000, description="URL that receives the job's events as signed "
                                "POSTs (Standard Webhooks); its host must be in the server's EQM_WEBHOOK_ALLOWED_HOSTS",
                                examples=["https://example.com/hooks/eqm"])
    webhook_events_filter: list[Literal["start", "progress", "image", "completed"]] | None = Field(
        None, max_length=4, description="events to send (default: all): start, progress (at most 2 per second), "
        "image (each image as it finishes), completed (done, failed or cancelled)", examples=[["completed"]])


class GenerationRequest(SamplingOptions):
    """Class-conditional (or unconditional) generation: ``n`` images per label."""

    labels: list[Label] = Field(default_factory=list, max_length=64, description=(
        "one entry per class to generate, each " + LABEL_DOC + "; empty = unconditional"), examples=[[3, "7"]])

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"labels": [3, "7"], "n": 2, "seed": 0, "guidance_scale": 1.5},
        {"labels": [5], "n": 4, "sampler": "nag", "step_size": 0.03, "mu": 0.3, "max_steps": 60,
         "grad_norm_threshold": 0.3, "format": "webp"},
    ]})


class CompositionRequest(SamplingOptions):
    """Composition: each image descends the weighted sum of several conditional gradient fields."""

    labels: list[Label] = Field(..., min_length=2, max_length=MAX_COMPOSITION_LABELS,
                                description="the classes to compose, each " + LABEL_DOC, examples=[[3, 8]])
    weights: list[Annotated[float, Field(ge=-10, le=10)]] | None = Field(
        None, max_length=MAX_COMPOSITION_LABELS, description="one weight per label, each in [-10, 10]; default 1/K "
        "each (the mean of the conditional fields) in guided mode, 1 each in sum mode", examples=[[0.5, 0.5]])
    mode: Literal["guided", "sum"] = Field("guided", description="guided: u + s * sum_k w_k (c_k - u) (rows: the "
                                           "labels and the unconditional one); sum: the paper's sum_k w_k c_k (no "
                                           "unconditional row, the guidance scale is not used)")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"labels": [3, 8], "weights": [0.5, 0.5], "n": 2, "seed": 0},
    ]})


class DenoiseForm(SamplingOptions):
    """Form fields of ``POST /v1/denoise`` (beside the ``image`` file)."""

    # The form also holds the file, so extras cannot be forbidden here; the handler rejects unknown fields.
    model_config = ConfigDict(extra="ignore", strict=False)

    label: str | None = Field(None, max_length=MAX_LABEL_CHARS, description="class to denoise towards, " + LABEL_DOC +
                              "; empty = unconditional", examples=["3"])
    noise_level: float | None = Field(None, ge=0, le=1, description="g in x = g*image + (1-g)*noise before the "
                                      "descent: 1 keeps the upload as it is, 0 replaces it by noise; empty = no "
                                      "extra noise (the upload is already noisy)", examples=[0.6])


# -- responses ----------------------------------------------------------------------------------

class JobLinks(BaseModel):
    self: str = Field(description="job status", examples=["/v1/jobs/4f0c1e..."])
    events: str = Field(description="server-sent events of the job", examples=["/v1/jobs/4f0c1e.../events"])
    images: list[str] = Field(description="one URL per image", examples=[["/v1/jobs/4f0c1e.../images/0"]])


class JobCreated(BaseModel):
    id: str = Field(examples=["4f0c1e9a0b6d4c1e8d2f7a5b3c9e1d20"])
    status: str = Field(examples=["queued"])
    kind: Literal["generate", "denoise", "compose", "inpaint"]
    model: str = Field(examples=["digits"])
    num_images: int = Field(examples=[2])
    links: JobLinks


class ImageStatus(BaseModel):
    index: int
    labels: list[int] = Field(description="class indices (empty = unconditional; 2+ = composition)")
    weights: list[float] | None = None
    seed: int
    ready: bool = Field(description="the image can be downloaded")
    steps: int = Field(description="gradient updates taken so far (final once ready)")
    grad_norm: float | None = Field(None, description="last gradient norm ||g||")
    stopped_early: bool | None = Field(None, description="stopped below the gradient-norm threshold")
    deadline_exceeded: bool | None = None
    energy: float | None = Field(None, description="EqM-E models: the final image's energy (official sign, lower "
                                 "on data; the guidance-weighted sum over its conditions); null otherwise")
    content_type: str = Field(examples=["image/png"])
    url: str
    b64_json: str | None = Field(None, description="with ?inline=true: the image bytes, base64, once ready")


class SamplerSettings(BaseModel):
    sampler: str
    step_size: float
    mu: float
    max_steps: int
    grad_norm_threshold: float
    epsilon_max: float = 0.0
    time_cutoff: float = 1.0


class Timings(BaseModel):
    queued_s: float | None = Field(None, description="from submission to the start on a worker")
    running_s: float | None = Field(None, description="from the start to the end (or until now)")
    total_s: float | None = Field(None, description="from submission to the end (or until now)")


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    kind: str
    model: str
    created: float | None = Field(None, description="unix seconds")
    started: float | None = None
    finished: float | None = None
    timings: Timings
    guidance_scale: float | None = Field(description="the classifier-free guidance scale the job runs with; null "
                                         "when it has none (a composition in \"sum\" mode)")
    sampler: SamplerSettings
    format: str
    noise_level: float | None = None
    deadline: float | None = Field(None, description="unix seconds")
    worker: str | None = None
    attempts: int
    error: str | None = None
    cancel_requested: bool
    queue_position: int | None = Field(None, description="while queued: jobs ahead of this one (0 = next)")
    eta_s: float | None = Field(None, description="while queued: estimated seconds until it finishes, from the "
                                "images ahead of it and the recent throughput (null without recent history)")
    images: list[ImageStatus]
    links: JobLinks

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "4f0c1e9a0b6d4c1e8d2f7a5b3c9e1d20", "status": "done", "kind": "generate", "model": "digits",
        "created": 1795385593.088, "started": 1795385593.095, "finished": 1795385593.446,
        "timings": {"queued_s": 0.0066, "running_s": 0.3515, "total_s": 0.3581}, "guidance_scale": 1.5,
        "sampler": {"sampler": "nag", "step_size": 0.05, "mu": 0.3, "max_steps": 60, "grad_norm_threshold": 1.0},
        "format": "png", "noise_level": None, "deadline": None, "worker": "gpu-host:4121:cuda:0", "attempts": 1,
        "error": None, "cancel_requested": False,
        "images": [{"index": 0, "labels": [3], "seed": 0, "ready": True, "steps": 27, "grad_norm": 0.93,
                    "stopped_early": True, "deadline_exceeded": False, "content_type": "image/png",
                    "url": "/v1/jobs/4f0c1e9a0b6d4c1e8d2f7a5b3c9e1d20/images/0"}],
        "links": {"self": "/v1/jobs/4f0c1e9a0b6d4c1e8d2f7a5b3c9e1d20",
                  "events": "/v1/jobs/4f0c1e9a0b6d4c1e8d2f7a5b3c9e1d20/events",
                  "images": ["/v1/jobs/4f0c1e9a0b6d4c1e8d2f7a5b3c9e1d20/images/0"]}}]})


class CancelResult(BaseModel):
    id: str
    status: str = Field(description="status after the request: cancelled at once when still queued; a running "
                        "job stops at its next step (poll the job or its events)")
    cancel_requested: bool
    message: str


class ModelDefaults(BaseModel):
    sampler: str
    step_size: float
    mu: float
    max_steps: int
    grad_norm_threshold: float
    guidance_scale: float
    composition_guidance_scale: float
    denoise_max_steps: int
    epsilon_max: float = 0.0
    time_cutoff: float = 1.0


class ModelLimits(BaseModel):
    max_images_per_job: int
    max_upload_bytes: int
    max_upload_pixels: int
    max_composition_labels: int


class ModelCard(BaseModel):
    name: str = Field(examples=["digits"])
    arch: str = Field(examples=["EqM-Digits/2"])
    image_size: int = Field(description="pixels per side of output images and of denoise inputs after resizing")
    channels: int = Field(description="1 = grey, 3 = RGB")
    latent_shape: list[int]
    codec: str
    guidance_mode: str
    energy_form: str = Field("none", description="none = implicit EqM (images scored by gradient norm); dot, l2 "
                             "or mean = EqM-E, an explicit energy (images carry their energy, lower on data); "
                             "potential = Energy Matching, the scalar potential V(x)")
    num_classes: int
    class_names: list[str] = Field(description="index = label; empty when the model has no names")
    defaults: ModelDefaults
    limits: ModelLimits
    upload_preprocessing: str
    default: bool = Field(False, description="the model a request that names none gets")
    samplers: list[str] = Field(default_factory=list, description="the samplers this model takes")
    workers: int = Field(0, description="live workers serving this model now (0: its jobs get 503)")
    queue_depth: int = Field(0, description="this model's jobs submitted and not yet started")
    loaded: bool = Field(False, description="whether a live worker holds the model loaded now")


class ModelList(BaseModel):
    models: list[ModelCard] = Field(description="every served model, the default first")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    redis: bool
    workers: int = Field(description="live workers serving the model")
    queue_depth: int | None = None
    detail: str


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["job 4f0c1e... not found (unknown, or expired after its TTL)"])


class FieldError(BaseModel):
    loc: list[Union[str, int]] = Field(examples=[["body", "labels", 0]])
    msg: str = Field(examples=["label 12 is out of range: class indices are 0..9"])
    type: str = Field(examples=["value_error"])


class ValidationErrorResponse(BaseModel):
    detail: list[FieldError]
    message: str = Field(description="the first problem, in one line",
                         examples=["body.labels.0: label 12 is out of range: class indices are 0..9"])


_ERROR_TEXT = {
    400: "the body could not be parsed (not UTF-8 JSON, or a malformed multipart form)",
    401: "API key missing or wrong (only when the server sets EQM_API_KEYS)",
    404: "unknown job or image (or expired after its TTL), or a model this server does not serve",
    409: "the image is not finished yet",
    413: "upload over the byte or pixel limit",
    415: "the upload is not a PNG, JPEG or WebP image",
    429: "the queue is full; retry after Retry-After seconds",
    503: "Redis unreachable or no live worker; retry after Retry-After seconds",
}
# What the body of each error says (the Swagger UI shows these as the examples).
_ERROR_EXAMPLE = {
    400: "Invalid multipart data.",
    401: "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
    404: "job 4f0c1e... not found (unknown, or expired after its TTL)",
    409: "image 0 of job 4f0c1e... is not finished yet (job running); follow the job's events or retry",
    413: "request body is over the limit of 10485760 bytes; send a smaller image (EQM_MAX_UPLOAD_BYTES on the server)",
    415: "the upload is not a PNG, JPEG or WebP image",
    429: "the queue is full (1000 jobs waiting, limit 1000); retry later",
    503: "no live worker serves model 'digits'; start one with `eqm worker` (or use `eqm serve`)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses`` entries for these error codes (422 always has the field-error shape)."""
    out: dict = {}
    for code in codes:
        if code == 422:
            out[422] = {"model": ValidationErrorResponse, "description": "a field is missing, malformed or out of range"}
            continue
        out[code] = {"model": ErrorResponse, "description": _ERROR_TEXT[code],
                     "content": {"application/json": {"example": {"detail": _ERROR_EXAMPLE[code]}}}}
        if code in (429, 503):
            out[code]["headers"] = _RETRY_AFTER
    return out
