"""Property tests: bbr reads the model the model server would read, or refuses."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbr import body as bodies
from bbr.decision import Label, Options, decide_request
from bbr.modelmap import ModelMap, parse_file_text

SNAPSHOT = ModelMap(
    parse_file_text(
        "kind: ConfigMap\nmetadata: {name: a}\ndata: {baseModel: base, adapters: '[lora]'}",
        path="m.yaml",
    ).configs
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
model_values = (
    st.sampled_from(["base", "lora", "model", "unknown"]) | st.text(max_size=20) | json_values
)


def reference(body: bytes) -> tuple[str, Any]:
    """What Python's json (what OpenAI-compatible servers run) reads, strictly."""
    pairs_seen: list[list[tuple[str, Any]]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        pairs_seen.append(pairs)
        return dict(pairs)

    doc = json.loads(body.decode("utf-8"), object_pairs_hook=hook)
    if not isinstance(doc, dict):
        return ("not-object", None)
    top = pairs_seen[-1]
    models = [v for k, v in top if k == "model"]
    if len(models) > 1:
        return ("duplicate", None)
    return ("ok", models[0] if models else None)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    model_values,
    st.booleans(),
    st.integers(min_value=0, max_value=2),
)
def test_agrees_with_python_json(doc: dict[str, Any], model: Any, ascii: bool, where: int) -> None:
    items = list(doc.items())
    items = [(k, v) for k, v in items if k != "model"]
    items.insert(min(where, len(items)), ("model", model))
    body = json.dumps(dict(items), ensure_ascii=ascii).encode()
    found = bodies.json_model(body) if isinstance(model, str) else None
    if isinstance(model, str):
        assert found == model
    else:
        try:
            bodies.json_model(body)
        except bodies.ModelError:
            pass
        else:
            raise AssertionError("a non-string model must be refused")


@settings(max_examples=1000)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_any_bytes_never_crash_and_never_disagree(body: bytes) -> None:
    try:
        found = bodies.json_model(body)
    except (bodies.BodyError, bodies.ModelError):
        return
    kind, model = reference(body)  # bbr accepted: the reference must read the same
    assert kind == "ok"
    assert model == found


json_fragments = st.lists(
    st.sampled_from(
        [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            '"model"',
            '"m\\u006fdel"',
            '"x"',
            '"base"',
            '"lora"',
            "1",
            "null",
            " ",
            '"\\ud800"',
            '"\\udc00"',
            '"\\ud83d\\ude00"',
            '"\xff"',
            '"é"',
            "1e999",
        ]
    ),
    max_size=16,
).map(lambda parts: "".join(parts).encode("utf-8", "surrogateescape"))


@settings(max_examples=2000)
@given(json_fragments)
def test_json_like_fragments_never_disagree(body: bytes) -> None:
    try:
        found = bodies.json_model(body)
    except (bodies.BodyError, bodies.ModelError):
        return
    kind, model = reference(body)
    assert kind == "ok"
    assert model == found


headers_strategy = st.dictionaries(
    st.sampled_from(
        [":method", ":path", "content-type", "content-encoding", "x-gateway-model-name"]
    ),
    st.sampled_from(
        [
            "POST",
            "GET",
            "/v1/models",
            "application/json",
            "multipart/form-data; boundary=b",
            "text/plain",
            "gzip",
            "deflate",
            "br",
            "",
            "base",
        ]
    ),
)


@settings(max_examples=1000)
@given(headers_strategy, st.none() | st.binary(max_size=200) | json_fragments, st.booleans())
def test_decision_never_raises_and_answers_a_spec_outcome(
    headers: dict[str, str], body: bytes | None, reject: bool
) -> None:
    options = Options(unknown_model="reject" if reject else "pass", models_endpoint=True)
    outcome = decide_request(headers, body, SNAPSHOT, options)
    assert outcome.status in (0, 200, 400, 404, 413)
    if outcome.label is Label.ROUTED:
        assert outcome.status == 0 and SNAPSHOT.lookup(outcome.model or "") == outcome.base_model
    if outcome.status in (400, 404, 413):
        payload = json.loads(outcome.body)
        assert payload["error"]["type"] == "invalid_request_error"


# Bodies of 16 KiB and more take the top-level walk (bbr/body.py _model_keys): the same
# answers must come out of it, whatever the layout of the top level.
member_keys = st.sampled_from(
    ["model", '"m\\u006fdel"', "messages", "pad", "x", "\\u0078", "temperature"]
)
member_values = st.sampled_from(
    [
        '"base"',
        '"lora"',
        '"other"',
        "null",
        "7",
        '{"model": "x"}',
        '["model"]',
        '"model"',
        '"' + "p" * 20_000 + '"',
        "[" + ",".join(['{"role": "model"}'] * 800) + "]",
    ]
)
spaces = st.sampled_from(["", " ", "\n  ", "\t"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(member_keys, member_values, spaces), min_size=1, max_size=6))
def test_large_bodies_agree_with_python_json(members: list[tuple[str, str, str]]) -> None:
    parts = []
    for key, value, space in members:
        token = key if key.startswith('"') else f'"{key}"'
        parts.append(f"{space}{token}{space}:{space}{value}{space}")
    body = ("{" + ",".join(parts) + ', "bulk": "' + "b" * 17_000 + '"}').encode()
    assert len(body) >= 16 * 1024
    kind, model = reference(body)
    try:
        found = bodies.json_model(body)
    except bodies.BodyError:
        assert kind == "duplicate"
        return
    except bodies.ModelError:
        assert kind == "ok" and not isinstance(model, str)
        return
    assert kind == "ok"
    assert found == model
