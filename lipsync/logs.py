"""How every lipsync process logs: one human line per event on a terminal, or one JSON object per line for log
collectors (`--log-format json`, `logging.json: true`); lipsync's own loggers at the chosen level, other libraries'
only from WARNING (their INFO is noise to our users); lines written around live progress bars, never through them.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601 with milliseconds), level, logger, message, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class ProgressAwareHandler(logging.StreamHandler):
    """Writes through tqdm when it is loaded, so a line logged while a progress bar runs goes above the bar
    instead of through it (tqdm is not imported for this: a process without bars never pays for it)."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
            return super().emit(record)
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup(level: str = "INFO", output: str = "text", line_format: str = TEXT_FORMAT,
          stream: TextIO | None = None) -> None:
    """(Re)configure the process's logging: one handler on `stream` (stderr), `output` "text" (`line_format`) or
    "json"."""
    if output not in FORMATS:
        raise ValueError(f"log format {output!r}: must be one of {', '.join(FORMATS)}")
    handler = ProgressAwareHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if output == "json" else logging.Formatter(line_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ProgressAwareHandler)]:  # ours only: a host's stay
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("lipsync").setLevel(level)
