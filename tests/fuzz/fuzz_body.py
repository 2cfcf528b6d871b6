"""Coverage-guided fuzz target (atheris) for the body parser and the decision.

    python tests/fuzz/fuzz_body.py tests/fuzz/corpus -max_total_time=60

Invariants: never an unexpected exception; every answer is a SPEC outcome; a model bbr
accepts from JSON is the model Python's json reads (parser agreement).
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from bbr import body as bodies
    from bbr.decision import Options, decide_request
    from bbr.modelmap import ModelMap, parse_file_text

SNAPSHOT = ModelMap(
    parse_file_text(
        "kind: ConfigMap\nmetadata: {name: a}\ndata: {baseModel: base, adapters: '[lora]'}",
        path="fuzz.yaml",
    ).configs
)
OPTIONS = Options(max_body_bytes=1 << 16, models_endpoint=True)
CONTENT_TYPES = [
    None,
    "application/json",
    "multipart/form-data; boundary=b",
    'multipart/form-data; boundary="XyZ"',
    "text/plain",
]
ENCODINGS = [None, "gzip", "deflate", "br"]


def strict_reference(data: bytes) -> object:
    pairs: list[list[tuple[str, object]]] = []

    def hook(items: list[tuple[str, object]]) -> dict[str, object]:
        pairs.append(items)
        return dict(items)

    doc = json.loads(data.decode("utf-8"), object_pairs_hook=hook)
    assert isinstance(doc, dict)
    models = [v for k, v in pairs[-1] if k == "model"]
    assert len(models) <= 1, "bbr accepted a duplicate model key"
    return models[0] if models else None


def test_one(data: bytes) -> None:
    if not data:
        return
    selector, payload = data[0], data[1:]
    try:
        found = bodies.json_model(payload)
    except (bodies.BodyError, bodies.ModelError):
        pass
    else:
        assert strict_reference(payload) == found, "parser disagreement"
    headers = {":method": "POST", ":path": "/v1/chat/completions"}
    content_type = CONTENT_TYPES[selector % len(CONTENT_TYPES)]
    encoding = ENCODINGS[(selector // len(CONTENT_TYPES)) % len(ENCODINGS)]
    if content_type:
        headers["content-type"] = content_type
    if encoding:
        headers["content-encoding"] = encoding
    outcome = decide_request(headers, payload, SNAPSHOT, OPTIONS)
    assert outcome.status in (0, 200, 400, 404, 413), outcome
    if outcome.status:
        assert json.loads(outcome.body)["error"]["type"] == "invalid_request_error"


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
