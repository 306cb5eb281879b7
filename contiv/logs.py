"""
Log output as JSON lines, for log shippers.

twistd logs human-readable text by default; C{--log-format=json} names
L{json_observer} as twistd's log observer factory, so that every line twistd
and contiv write, from the first, is one JSON object.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, Mapping, TextIO

from twisted.logger import FileLogObserver, formatEvent
from twisted.python.failure import Failure

# Keys that twisted.logger uses for its own bookkeeping; the named fields a
# message carries are everything else.
_INTERNAL = {"log_format", "log_level", "log_namespace", "log_source", "log_time",
             "log_logger", "log_failure", "log_system", "log_io", "log_text",
             "log_legacy", "log_trace", "log_flattened", "format", "message", "time",
             "system", "isError", "why", "failure", "log_observer"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value) if not isinstance(value, bytes) else value.decode("utf-8", "replace")


def format_json(event: Mapping[str, Any]) -> str:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
        .isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "msg": formatEvent(event),
    }
    for key, value in event.items():
        if key not in _INTERNAL and not key.startswith("log_"):
            record.setdefault(key, _jsonable(value))
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, sort_keys=False) + "\n"


def json_observer(out: TextIO | None = None) -> FileLogObserver:
    """A twistd C{--logger} factory: JSON lines on standard output."""
    return FileLogObserver(out if out is not None else sys.stdout, format_json)
