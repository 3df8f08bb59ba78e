"""Process logging for `bgeserve serve`: plain lines, or one JSON object per line (`--log-json`).

Either way a record is one line that a client cannot forge (control characters in a plain line are
escaped; JSON escapes them itself), and a burst of one message (a flood of bad connections, the
descriptor limit) is cut to a few lines a second.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

# Identical records let through per second; the rest are counted.
REPEATS_PER_SECOND = 5


def escape_controls(text: str) -> str:
    """`text` with every non-printable character (newline, ESC, ...) written as its Python escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class PlainFormatter(logging.Formatter):
    """`time level logger: message`, the message's control characters escaped (a decoded `%0a` in a
    request path cannot start a forged line, nor an escape sequence reach a terminal)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record = logging.makeLogRecord({**record.__dict__, "message": escape_controls(record.message)})
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...extra fields}` per record."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Fields passed with `extra=` (e.g. the request log's route, status, duration).
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RepeatLimiter(logging.Filter):
    """Lets `per_second` identical records (logger, level, message) through each second and drops the
    rest; the next one let through says how many were dropped. `dropped` counts them all.

    The request log (one line per answered request, see `middleware.RequestObserver`) is never dropped:
    its lines are bounded by the requests served, and two may read alike.
    """

    def __init__(self, per_second: int = REPEATS_PER_SECOND, clock=time.monotonic) -> None:
        super().__init__()
        self.per_second = per_second
        self.clock = clock
        self.dropped = 0
        self._lock = threading.Lock()
        # kind -> [second, records let through in it, dropped since the last one let through]
        self._seen: dict[tuple, list[int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if "duration_ms" in record.__dict__:
            return True
        kind = (record.name, record.levelno, record.getMessage()[:500])
        second = int(self.clock())
        with self._lock:
            state = self._seen.get(kind)
            if state is None:
                if len(self._seen) > 10_000:  # messages made of data must not grow this without bound
                    self._seen.clear()
                state = self._seen[kind] = [second, 0, 0]
            if state[0] != second:
                state[0], state[1] = second, 0
            if state[1] >= self.per_second:
                state[2] += 1
                self.dropped += 1
                return False
            state[1] += 1
            dropped, state[2] = state[2], 0
        if dropped:
            record.msg = f"{record.getMessage()} [{dropped} more like this dropped]"
            record.args = None
        return True


def configure_logging(json_lines: bool, level: str = "info") -> None:
    """Sends every logger (uvicorn's and asyncio's too) to stderr in the chosen format, bursts limited."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatLimiter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
