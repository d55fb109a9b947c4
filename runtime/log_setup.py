"""Structured logs for the server: every record carries the request id of the HTTP request it belongs to
(a context variable set by the server's middleware; the engine thread passes it explicitly), and any
``extra={...}`` fields. Text by default, one JSON object per line with ``--log-json``."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "request_id"}


def _extra_fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            out["request_id"] = record.request_id
        out.update(_extra_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s %(message)s%(fields)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        fields = _extra_fields(record)
        fields.pop("rid", None)
        fields.pop("fields", None)
        record.fields = "".join(f" {k}={v}" for k, v in fields.items())
        return super().format(record)


def setup_logging(level: str = "info", json_logs: bool = False, stream=None) -> None:
    """Configure the root logger for the server process (replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler._pagedserve_setup = (level, json_logs)  # what child processes repeat (see current_setup)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def current_setup() -> tuple[str, bool] | None:
    """(level, json_logs) of the last ``setup_logging`` still in place, for a child process to repeat; None
    when the root logger was configured some other way (a test runner, an embedding application)."""
    for h in logging.getLogger().handlers:
        setup = getattr(h, "_pagedserve_setup", None)
        if setup is not None:
            return setup
    return None
