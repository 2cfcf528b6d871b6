"""The request log line: the short cut into the batch writes what `logging` would."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bbr import logs

FIELDS = {"outcome": "routed", "model": "food", "base_model": "llama", "status": None}


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    sink = io.StringIO()
    logs.configure("info", "json", stream=sink)
    yield sink
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = saved
    logs._json = None


def lines(sink: io.StringIO) -> list[dict[str, object]]:
    logging.getLogger().handlers[0].flush()
    return [json.loads(line) for line in sink.getvalue().splitlines()]


def test_short_cut_line_matches_the_logging_line(configured: io.StringIO) -> None:
    logger = logging.getLogger("bbr.request")
    logs.log_info(logger, "request", FIELDS)  # the short cut
    logger.info("request", extra=logs.fields(**FIELDS))  # through logging
    fast, slow = lines(configured)
    assert fast.keys() == slow.keys()
    assert {k: v for k, v in fast.items() if k != "time"} == {
        k: v for k, v in slow.items() if k != "time"
    }
    assert str(fast["time"]).endswith("Z") and len(str(fast["time"])) == len(str(slow["time"]))


def test_lines_stay_in_order_with_other_log_lines(configured: io.StringIO) -> None:
    request, other = logging.getLogger("bbr.request"), logging.getLogger("bbr")
    logs.log_info(request, "request", {"n": 1})
    other.info("model map in force")
    logs.log_info(request, "request", {"n": 2})
    assert [line["msg"] for line in lines(configured)] == [
        "request",
        "model map in force",
        "request",
    ]


def test_level_and_other_handlers_are_honoured(
    configured: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("bbr.request")
    logger.setLevel(logging.WARNING)
    try:
        logs.log_info(logger, "request", FIELDS)
    finally:
        logger.setLevel(logging.NOTSET)
    assert lines(configured) == []
    with caplog.at_level(logging.INFO, logger="bbr.request"):  # another handler: via logging
        logs.log_info(logger, "request", FIELDS)
    assert [r.fields for r in caplog.records] == [FIELDS]  # type: ignore[attr-defined]
