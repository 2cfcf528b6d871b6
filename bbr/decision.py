"""What to do with one request: a pure function of its headers, body and the model map.

No gRPC here. The protocol layer asks twice: `plan` when the request headers arrive
(is there a body to read, and how?) and `decide` once the body is complete.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from bbr import body as bodies
from bbr.modelmap import MAX_NAME_BYTES, ModelMap, name_problem

BASE_MODEL_HEADER = "x-gateway-base-model-name"
MODEL_HEADER = "x-gateway-model-name"
ROUTING_HEADERS = (BASE_MODEL_HEADER, MODEL_HEADER)
MAX_MODEL_BYTES = MAX_NAME_BYTES


class Label(enum.StrEnum):
    """The `outcome` label of bbr_requests_total."""

    ROUTED = "routed"
    UNKNOWN_MODEL = "unknown_model"
    NO_MODEL = "no_model"
    INVALID = "invalid"
    TOO_LARGE = "too_large"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True, slots=True)
class Options:
    unknown_model: str = "pass"  # or "reject"
    max_body_bytes: int = 16 * 1024 * 1024
    models_endpoint: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer for one request.

    `status == 0` lets the request continue, with `model` (and `base_model` when known)
    as routing headers; otherwise bbr answers the client itself with `status`/`body`.
    """

    label: Label
    model: str | None = None
    base_model: str | None = None
    status: int = 0
    body: bytes = b""
    code: str | None = None

    @property
    def continues(self) -> bool:
        return self.status == 0


PASSTHROUGH = Outcome(Label.PASSTHROUGH)
NO_MODEL = Outcome(Label.NO_MODEL)


def error(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    label: Label,
    model: str | None = None,
) -> Outcome:
    """An OpenAI-style error reply."""
    payload = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }
    return Outcome(label, model=model, status=status, body=msgspec.json.encode(payload), code=code)


def _quote(value: str) -> str:
    """Client input for an error message: never more than 256 bytes of it."""
    raw = value.encode("utf-8", "replace")
    if len(raw) <= MAX_MODEL_BYTES:
        return repr(value)
    return repr(raw[:MAX_MODEL_BYTES].decode("utf-8", "ignore")) + "…"


def too_large(limit: int) -> Outcome:
    return error(
        413,
        "request_too_large",
        f"request body is larger than the {limit} bytes this gateway accepts",
        label=Label.TOO_LARGE,
    )


def invalid_json(message: str) -> Outcome:
    return error(400, "invalid_json", message, label=Label.INVALID)


def invalid_model(message: str) -> Outcome:
    return error(400, "invalid_model", message, param="model", label=Label.INVALID)


class BodyKind(enum.Enum):
    NONE = "none"  # nothing to read: pass the body through untouched
    JSON = "json"
    MULTIPART = "multipart"


@dataclass(frozen=True, slots=True)
class Plan:
    """What the request headers tell: answer now, or read the body (and how)."""

    kind: BodyKind
    outcome: Outcome | None = None  # set when the answer is known from headers alone
    encoding: str | None = None  # "gzip" / "deflate" when the body must be decompressed
    boundary: bytes | None = None  # multipart/form-data boundary

    @property
    def reads_body(self) -> bool:
        return self.outcome is None and self.kind is not BodyKind.NONE


PASSTHROUGH_PLAN = Plan(BodyKind.NONE)  # no body to read (or none bbr can): pass it through
JSON_PLAN = Plan(BodyKind.JSON)


def plan(
    headers: Mapping[str, str],
    snapshot: ModelMap,
    options: Options,
    *,
    end_of_stream: bool = False,
) -> Plan:
    """Decide from the request headers alone (lower-case names, pseudo-headers included)."""
    if options.models_endpoint and headers.get(":method") == "GET":
        path = headers.get(":path", "")
        if path.split("?", 1)[0] == "/v1/models":
            # bbr answers 200 itself, yet the outcome is `passthrough`: SPEC §5 and the
            # README's metrics table put /v1/models there, and dashboards count on it.
            return Plan(
                BodyKind.NONE,
                Outcome(Label.PASSTHROUGH, status=200, body=snapshot.models_body),
            )
    if end_of_stream:
        return PASSTHROUGH_PLAN
    content_type = headers.get("content-type")
    kind, boundary = _body_kind(content_type)
    if kind is BodyKind.NONE:
        return PASSTHROUGH_PLAN
    if kind is BodyKind.MULTIPART and boundary is None:
        return Plan(kind, invalid_json("multipart/form-data without a boundary"))
    encoding = headers.get("content-encoding")
    if encoding is not None:
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            encoding = None
        elif encoding not in bodies.DECOMPRESSORS:
            return PASSTHROUGH_PLAN  # we cannot read it, so we do not touch it
    if kind is BodyKind.JSON and encoding is None:
        return JSON_PLAN
    return Plan(kind, encoding=encoding, boundary=boundary)


def _body_kind(content_type: str | None) -> tuple[BodyKind, bytes | None]:
    if content_type is None:
        return BodyKind.JSON, None
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media in ("", "application/json") or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return BodyKind.JSON, None
    if media == "multipart/form-data":
        return BodyKind.MULTIPART, bodies.multipart_boundary(params)
    return BodyKind.NONE, None


def decide(body: bytes, plan: Plan, snapshot: ModelMap, options: Options) -> Outcome:
    """The outcome for a complete body read under `plan`."""
    if plan.outcome is not None:
        return plan.outcome
    if plan.kind is BodyKind.NONE or not body:
        # An empty body is no body, however Envoy framed it (content-length 0 with
        # end_of_stream, an empty body message, empty streamed chunks).
        return PASSTHROUGH
    if len(body) > options.max_body_bytes:
        return too_large(options.max_body_bytes)
    if plan.encoding is not None:
        try:
            body = bodies.decompress(body, plan.encoding, options.max_body_bytes)
        except bodies.TooLarge:
            return too_large(options.max_body_bytes)
        except bodies.BodyError as exc:
            return invalid_json(str(exc))
    try:
        if plan.kind is BodyKind.MULTIPART:
            assert plan.boundary is not None
            found = bodies.multipart_model(body, plan.boundary)
        else:
            found = bodies.json_model(body)
    except bodies.BodyError as exc:
        return invalid_json(str(exc))
    except bodies.ModelError as exc:
        return invalid_model(str(exc))
    if found is None:
        return NO_MODEL
    return route(found, snapshot, options)


def route(model: str, snapshot: ModelMap, options: Options) -> Outcome:
    """The outcome for a model name read from a body."""
    # snapshot.lookup(model), unrolled: a Python frame fewer on every request
    base = snapshot.route_shards[hash(model) & snapshot.route_mask].get(model)
    if base is not None:
        return Outcome(Label.ROUTED, model=model, base_model=base)
    if problem := model_problem(model):
        return invalid_model(problem)
    if options.unknown_model == "reject":
        return error(
            404,
            "model_not_found",
            f"The model {_quote(model)} does not exist",
            param="model",
            label=Label.UNKNOWN_MODEL,
            model=model,
        )
    return Outcome(Label.UNKNOWN_MODEL, model=model)


def model_problem(model: str) -> str | None:
    """Why `model` cannot travel as a header value, or None: the model map's name rule."""
    if model.isprintable() and 0 < len(model) <= MAX_MODEL_BYTES // 4:
        return None  # the common case, without encoding (a code point is <= 4 bytes)
    problem = name_problem(model)
    if problem is None:
        return None
    if problem == "empty name":
        return "'model' must not be empty"
    return f"'model' {problem}"


def decide_request(
    headers: Mapping[str, str],
    body: bytes | None,
    snapshot: ModelMap,
    options: Options,
) -> Outcome:
    """The whole decision for a buffered request: headers plus body (None: no body)."""
    p = plan(headers, snapshot, options, end_of_stream=body is None)
    return decide(body or b"", p, snapshot, options)
