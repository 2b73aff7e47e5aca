"""`sitewarden.logs`: one JSON object per line with the trace id inside a traced request, or readable text."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
from opentelemetry.sdk.trace import TracerProvider

from sitewarden import logs


@pytest.fixture
def restore_logging() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_lines_carry_time_level_logger_message_extra_fields_and_the_trace_id(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    log = logging.getLogger("sitewarden.agent.sync")
    log.info("activated %s %s", "fraud-scorer", "1.0.0", extra={"release": "fraud-scorer@1.0.0"})
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        log.warning("refused in a request")
        trace_id = format(span.get_span_context().trace_id, "032x")
    log.debug("below the level")
    first, second = (json.loads(line) for line in lines(stream))
    assert first["message"] == "activated fraud-scorer 1.0.0" and first["level"] == "INFO"
    assert first["logger"] == "sitewarden.agent.sync" and first["release"] == "fraud-scorer@1.0.0"
    assert first["time"].endswith("+00:00") and "trace_id" not in first
    assert second["trace_id"] == trace_id and second["level"] == "WARNING"


def test_text_lines_are_readable_with_the_trace_id_at_the_end(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("warning", "text", stream=stream)
    with TracerProvider().get_tracer("test").start_as_current_span("request") as span:
        logging.getLogger("sitewarden.controller").error("witness refused a fork")
        trace_id = format(span.get_span_context().trace_id, "032x")
    logging.getLogger("uvicorn.error").info("not at warning")
    (line,) = lines(stream)
    assert line.endswith(f"Z ERROR sitewarden.controller: witness refused a fork [trace {trace_id}]")


def test_python_warnings_and_uvicorn_lines_come_out_in_the_same_format(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/v2", "1.1", 200)
    warnings.warn("something deprecated", DeprecationWarning, stacklevel=1)
    records = [json.loads(line) for line in lines(stream)]
    assert records[0]["logger"] == "uvicorn.access" and records[0]["message"].endswith('"GET /v2 HTTP/1.1" 200')
    assert records[1]["logger"] == "py.warnings" and "something deprecated" in records[1]["message"]


def test_an_unknown_format_or_level_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.log_config("info", "xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log level 'loud'"):
        logs.log_config("loud", "json")
