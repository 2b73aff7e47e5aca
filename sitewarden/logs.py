"""Logs of the controller and the agent: readable lines for a terminal, or one JSON object per line for a collector.

`--log-format text` (the default) writes `<time> <LEVEL> <logger>: <message>`; `--log-format json` writes one
JSON object per line (python-json-logger) with `time` (RFC 3339, UTC), `level`, `logger`, `message`, the
OpenTelemetry `trace_id` when the line is written inside a traced request, any structured fields the call
passes as `extra`, and `exc_info` for an exception. uvicorn's own lines (server and access log) go through the
same handler, so a process writes one format only. `log_config` is the `logging.config.dictConfig` document,
for uvicorn's `log_config`; `configure` applies it directly (for commands that run no server). Lines go to
standard error unless a stream is named.
"""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Annotated, Any, Literal, TextIO

import typer
from pythonjsonlogger.json import JsonFormatter

from sitewarden.telemetry import current_trace_id

Format = Literal["text", "json"]
FORMATS: tuple[Format, ...] = ("text", "json")
LEVELS = ("critical", "error", "warning", "info", "debug")

# The options `agent run` and `controller serve` share.
LevelOption = Annotated[str, typer.Option("--log-level", help="critical, error, warning, info (default) or debug.")]
FormatOption = Annotated[
    str,
    typer.Option(
        "--log-format",
        envvar="SITEWARDEN_LOG_FORMAT",
        help="text (default) or json: one JSON object per line, with the trace id where there is one.",
    ),
]


class TraceIdFilter(logging.Filter):
    """Puts the current span's trace id on a record, when there is one, so that a line can be tied to a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            trace_id = current_trace_id()
            if trace_id is not None:
                record.trace_id = trace_id
        return True


class TextFormatter(logging.Formatter):
    """`2026-05-01T10:00:00.123Z INFO sitewarden.agent.sync: activated fraud-scorer 1.0.0 [trace 4bf9…]`."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{text} [trace {trace_id}]" if trace_id else text


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, message, then whatever the record carries."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
            json_ensure_ascii=False,
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        # uvicorn adds `color_message` (ANSI colours) to some records: a collector has no use for it.
        log_data.pop("color_message", None)


def log_config(level: str = "info", fmt: Format = "text") -> dict[str, Any]:
    """The dictConfig document: one handler, the chosen format, the root logger and uvicorn's at `level`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use text or json")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    upper = level.upper()
    formatter = "sitewarden.logs.JsonLineFormatter" if fmt == "json" else "sitewarden.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"trace": {"()": "sitewarden.logs.TraceIdFilter"}},
        "formatters": {"line": {"()": formatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "line",
                "filters": ["trace"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": upper},
        "loggers": {
            # uvicorn's loggers write through the root's handler; their own handlers would print twice.
            "uvicorn": {"handlers": [], "level": upper, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": upper, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": upper, "propagate": True},
            # One line per HTTP call to the controller (every long poll, every report) says nothing the
            # outcomes logged above do not; their failures come as warnings.
            "httpx": {"level": upper if upper == "DEBUG" else "WARNING"},
            "httpcore": {"level": upper if upper == "DEBUG" else "WARNING"},
        },
    }


def configure(level: str = "info", fmt: Format = "text", stream: TextIO | None = None) -> None:
    """Apply `log_config` to this process (to `stream` instead of standard error, if given)."""
    config = log_config(level, fmt)
    if stream is not None:
        config["handlers"]["default"]["stream"] = stream
    logging.config.dictConfig(config)
    logging.captureWarnings(True)  # Python's warnings as log lines too, not free text on standard error
