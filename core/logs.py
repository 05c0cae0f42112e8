"""Logging: one JSON object per line on stdout, for the gateway and for Granian's own loggers.

The configuration is built here, once, and handed to Granian (`log_dictconfig`), which applies
it in the parent and again in every worker it forks. Structured fields travel in
`extra={"fields": {...}}` and are merged into the line; the message stays a short constant.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

FIELDS = "fields"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...fields}`, serialized once with orjson."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _iso(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def dict_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the whole process, Granian's loggers included."""
    handler = {"class": "logging.StreamHandler", "formatter": "json",
               "stream": "ext://sys.stdout"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "llm_gateway.logs.JsonFormatter"}},
        "handlers": {"json": handler},
        "loggers": {
            "_granian": {"handlers": ["json"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["json"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["json"], "level": level},
    }


def setup(level: str) -> None:
    import logging.config

    logging.config.dictConfig(dict_config(level))
