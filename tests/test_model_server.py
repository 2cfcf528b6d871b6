"""The demo's simulated model servers speak enough OpenAI for the official `openai` SDK.

Each answer (each streamed event too) still reports the routing headers the server
received, in `x_bbr_demo`. The servers run in-process on free ports; no Envoy here
(tests/e2e/test_readme.py goes through the whole demo).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from harness.model_server import ModelServer

BASE = "meta-llama/Llama-3.1-8B-Instruct"
ROUTING = {"x-gateway-base-model-name": BASE, "x-gateway-model-name": "food-review-1"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ModelServer("127.0.0.1", 0, "pool-llama", base_model=BASE, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    http = httpx.Client(trust_env=False)
    return OpenAI(base_url=url, api_key="unused", http_client=http, max_retries=0)


def demo_of(obj: object) -> dict[str, object]:
    extra = getattr(obj, "model_extra", None) or {}
    report = extra.get("x_bbr_demo")
    assert isinstance(report, dict), obj
    assert report["server"] == "pool-llama"
    assert report["base_model_header"] == BASE and report["model_header"] == "food-review-1"
    return report


def test_chat_stream_yields_the_text_as_server_sent_events(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="food-review-1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=ROUTING,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"[pool-llama] hello from {BASE} serving food-review-1"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    for chunk in chunks:
        demo_of(chunk)


def test_chat_and_completions(client: OpenAI) -> None:
    chat = client.chat.completions.create(
        model="food-review-1", messages=[{"role": "user", "content": "hi"}], extra_headers=ROUTING
    )
    assert chat.choices[0].message.content is not None
    assert "serving food-review-1" in chat.choices[0].message.content
    demo_of(chat)
    completion = client.completions.create(
        model="food-review-1", prompt="hi", extra_headers=ROUTING
    )
    assert "serving food-review-1" in completion.choices[0].text
    demo_of(completion)
    streamed = client.completions.create(
        model="food-review-1", prompt="hi", stream=True, extra_headers=ROUTING
    )
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


@pytest.mark.parametrize("encoding", [None, "float"])
def test_embeddings_have_the_real_shape(client: OpenAI, encoding: str | None) -> None:
    """The SDK asks for base64 unless told otherwise, and decodes it itself."""
    extra = {} if encoding is None else {"encoding_format": encoding}
    result = client.embeddings.create(
        model="food-review-1", input=["hi", "there"], extra_headers=ROUTING, **extra
    )
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 16 for d in result.data)
    assert result.data[0].embedding != result.data[1].embedding
    assert abs(sum(v * v for v in result.data[0].embedding) - 1) < 1e-3
    assert result.usage.prompt_tokens > 0
    demo_of(result)
    sized = client.embeddings.create(model="food-review-1", input="hi", dimensions=4)
    assert len(sized.data[0].embedding) == 4


def test_embeddings_asked_for_in_base64_are_float32(client: OpenAI) -> None:
    import base64
    import struct

    result = client.embeddings.create(model="food-review-1", input="hi", encoding_format="base64")
    packed = base64.b64decode(str(result.data[0].embedding))
    floats = client.embeddings.create(model="food-review-1", input="hi", encoding_format="float")
    assert struct.unpack("<16f", packed) == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_responses_plain_and_streamed(client: OpenAI) -> None:
    response = client.responses.create(model="food-review-1", input="hi", extra_headers=ROUTING)
    assert response.output_text == f"[pool-llama] hello from {BASE} serving food-review-1"
    demo_of(response)
    events = list(
        client.responses.create(
            model="food-review-1", input="hi", stream=True, extra_headers=ROUTING
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == response.output_text
    assert events[-1].type == "response.completed"


def test_transcriptions_are_multipart(client: OpenAI) -> None:
    audio = ("a.wav", b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio/wav")
    result = client.audio.transcriptions.create(
        model="food-review-1", file=audio, extra_headers=ROUTING
    )
    assert result.text == f"[pool-llama] transcribed by {BASE} for food-review-1"
    demo_of(result)
    text = client.audio.transcriptions.create(
        model="food-review-1", file=audio, response_format="text"
    )
    assert text == result.text


def test_models_list_and_retrieve(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [BASE]
    assert client.models.retrieve(BASE).id == BASE
