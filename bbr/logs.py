"""Logging: one JSON object a line (or plain text for people at a terminal)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

import msgspec

_encode = msgspec.json.Encoder().encode


FLUSH_SECONDS = 0.2


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _time(self, record: logging.LogRecord) -> str:
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower():7} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class BatchingHandler(logging.Handler):
    """Writes lines to a stream in batches, at most FLUSH_SECONDS late.

    One write (a syscall) per request log line costs more than the rest of the line;
    warnings and errors, and exit, still flush at once.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._pending: list[str] = []
        self._closed = threading.Event()
        threading.Thread(target=self._run, name="bbr-log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)  # handle() holds self.lock around emit()
        if record.levelno >= logging.WARNING:
            self.flush()

    def append(self, line: str) -> None:
        """A line formatted elsewhere (`log_info`), queued like the others."""
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(line)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._pending = self._pending, []
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()

    def _run(self) -> None:
        while not self._closed.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except (OSError, ValueError):  # stderr closed under us: nothing to log to
                return


# The handler and formatter `configure` installed for JSON, for `log_info`'s short cut.
_json: tuple[BatchingHandler, JsonFormatter] | None = None


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    global _json
    handler = BatchingHandler(sys.stderr if stream is None else stream)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    _json = (handler, formatter) if isinstance(formatter, JsonFormatter) else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(max(root.level, logging.WARNING))


def log_info(logger: logging.Logger, message: str, values: dict[str, Any]) -> None:
    """An info line with fields; the hot path's (one per request) way to log.

    When bbr's JSON handler is the only one in play, the line is encoded straight into
    its batch, skipping LogRecord and formatter (~15 µs of a ~60 µs small request); the
    line is the same. Anything else — another handler (pytest's caplog), a text format,
    filters — goes through `logging` as usual.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    if (
        _json is not None
        and not logger.handlers
        and not logger.filters
        and logger.propagate
        and logging.getLogger().handlers == [_json[0]]
    ):
        handler, formatter = _json
        now = time.time()
        entry: dict[str, Any] = {
            "time": formatter.stamp(now, (now - int(now)) * 1000),
            "level": "info",
            "logger": logger.name,
            "msg": message,
        }
        entry.update(values)
        handler.append(_encode(entry).decode())
        return
    logger.info(message, extra={"fields": values})


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: structured fields of the line."""
    return {"fields": values}
