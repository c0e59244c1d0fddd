"""Structured logs: one logfmt line per event on stderr (key=value, greppable and parseable)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("conduit")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log(logger: logging.Logger, level: str, event: str, **fields: Any) -> None:
    logger.log(logging.getLevelName(level.upper()), event, extra={"fields": fields})


class Outage:
    """A failure that repeats, such as retry loops while the database is down, logged as one line
    when it begins, one reminder a minute while it lasts, and one line when it is over, so an
    outage costs a few lines however many loops retry or however long it lasts. Thread-safe."""

    def __init__(self, logger: logging.Logger, name: str, remind_every: float = 60.0) -> None:
        self._logger = logger
        self._name = name
        self._remind_every = remind_every
        self._lock = threading.Lock()
        self._began: float | None = None
        self._reminded = 0.0
        self._failures = 0

    def failed(self, event: str, level: str = "error", **fields: Any) -> None:
        """Log `event` if it begins an outage or a minute passed since the last line; else count it."""
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            if self._began is None:
                self._began = self._reminded = now
                extra: dict[str, Any] = {}
            elif now - self._reminded >= self._remind_every:
                self._reminded = now
                extra = {"failures": self._failures, "for_s": round(now - self._began, 1)}
            else:
                return
        log(self._logger, level, event, **{**fields, **extra})

    def over(self) -> None:
        """Something worked again: log how long the outage lasted, if there was one."""
        with self._lock:
            if self._began is None:
                return
            seconds, failures = time.monotonic() - self._began, self._failures
            self._began, self._failures = None, 0
        log(self._logger, "info", f"{self._name}_recovered", failures=failures, after_s=round(seconds, 1))
