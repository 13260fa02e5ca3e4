"""Dead letters: every input the pipeline cannot use, with where and why.

Every DoFn that can reject a record yields `dead_letter(...)` on the output tag
`DEAD_LETTERS` instead of raising or dropping it. Rows follow
`schemas.DEAD_LETTERS`; the payload is already pseudonymised by the caller
(see `Pseudonymiser.scrub_text`) and truncated here.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from apache_beam.metrics import Metrics

DEAD_LETTERS = "dead_letters"
MAX_PAYLOAD_CHARS = 4096


def _payload_text(payload: Any) -> str:
    if isinstance(payload, bytes):
        text = payload.decode("utf-8", errors="replace")
    elif isinstance(payload, str):
        text = payload
    else:
        text = json.dumps(payload, default=str, sort_keys=True)
    if len(text) > MAX_PAYLOAD_CHARS:
        text = text[:MAX_PAYLOAD_CHARS] + f"...[{len(text) - MAX_PAYLOAD_CHARS} more characters]"
    return text


def dead_letter(
    stage: str,
    reason: str,
    payload: Any,
    *,
    recorded_at: dt.datetime,
    source: str | None = None,
    event_time: dt.datetime | None = None,
    record_count: int = 1,
) -> dict:
    """One `dead_letters` row. Also counts it in the Beam metric ``dead_letters/<stage>``."""
    Metrics.counter("dead_letters", stage).inc(record_count)
    return {
        "stage": stage,
        "reason": reason,
        "source": source,
        "payload": _payload_text(payload),
        "record_count": record_count,
        "event_time": event_time,
        "recorded_at": recorded_at,
    }
