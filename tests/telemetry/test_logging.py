"""The buffered log handler: INFO lines wait a little, warnings take everything out at once, in order."""

from __future__ import annotations

import io
import logging
import time

from keel.telemetry.logging import BufferedStreamHandler, JsonFormatter


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"keel.test.buffered.{id(handler)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger


def test_info_waits_and_a_warning_writes_everything_in_order() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, interval=60)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = _logger(handler)
    logger.info("one")
    logger.info("two")
    assert stream.getvalue() == ""  # batched
    logger.warning("three")
    assert stream.getvalue() == "INFO one\nINFO two\nWARNING three\n"
    logger.info("four")
    handler.close()  # shutdown writes what waits
    assert stream.getvalue().endswith("INFO four\n")


def test_waiting_lines_go_out_within_the_interval() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, interval=0.05)
    handler.setFormatter(JsonFormatter())
    logger = _logger(handler)
    logger.info("hello", extra={"status": 200})
    deadline = time.monotonic() + 2
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert '"message":"hello"' in stream.getvalue()
    assert '"status":200' in stream.getvalue()
    handler.close()


def test_a_full_buffer_is_written_without_waiting() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, interval=60, max_bytes=100)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = _logger(handler)
    for i in range(20):
        logger.info("line %02d", i)
    assert stream.getvalue().startswith("line 00\n")
    handler.close()
    assert stream.getvalue().count("\n") == 20
