"""Dead letters: every input the pipeline cannot use, with where and why, and nothing it must not keep.

Every DoFn that can reject a record yields `dead_letter(...)` on the output tag
`DEAD_LETTERS` instead of raising or dropping it. Rows follow `schemas.DEAD_LETTERS`.

A dead letter's payload is built by **allow-list**, never by scrubbing the raw text
(`allowed_payload`): it keeps only the fields the record's schema declares, each as
a short scalar; a field marked ``identifying`` or ``free_text`` (a uri) is replaced by its keyed
pseudonym; an
enumerated field keeps its value only when the value is one of the allowed ones;
anything else (a list or object where a scalar belongs, an unknown field, a
field of an unknown nested record) is dropped or withheld and counted
(``unknown_fields_dropped``). The raw record itself is represented only by its byte
length and a keyed digest (``raw_length``, ``raw_digest``), so support can match a
dead letter to the landed line without the dead letter holding what the line said.
Reasons follow the same rule (`schemas.contract._shown`).

Everything here is bounded: nesting depth is checked iteratively (`within_depth`)
before anything recursive touches an input, repeated fields keep at most
`MAX_ITEMS` items, strings at most `MAX_VALUE_CHARS` characters, and the payload
text at most `MAX_PAYLOAD_CHARS`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Mapping, Sequence

import orjson
from apache_beam.metrics import Metrics

from schemas.contract import RECORD, STRING, TIMESTAMP, Field, SchemaError, parse_timestamp

DEAD_LETTERS = "dead_letters"
MAX_PAYLOAD_CHARS = 4096
MAX_DEPTH = 32  # containers within containers in any input record; ours need 3
MAX_ITEMS = 20  # items of a repeated field kept in a dead letter (the rest are counted)
MAX_VALUE_CHARS = 200
WITHHELD = "(value withheld)"


def within_depth(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` nests lists/dicts at most `limit` deep (a scalar is depth 0). Iterative."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, (Mapping, list, tuple)))
    return True


def _allowed_scalar(f: Field, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str):
        if f.choices and value not in f.choices:
            return "(value withheld: not an allowed value)"
        if f.type == TIMESTAMP:  # kept only when it is one: a string in a timestamp field may be anything
            try:
                parse_timestamp(value, f.name)
            except SchemaError:
                return "(value withheld: not a timestamp)"
        elif f.type != STRING:
            return "(value withheld: str)"
        return value[:MAX_VALUE_CHARS]
    return f"(value withheld: {type(value).__name__})"


def allowed_payload(fields: Sequence[Field], record: Any, pseudonym: Callable[[str], str]) -> tuple[dict, int]:
    """The declared, non-identifying parts of `record` and pseudonyms of the identifying ones.

    Args:
      fields: the record's schema fields.
      record: the record as read (any value; only a mapping has fields to keep).
      pseudonym: identifier string -> its pseudonym (``Pseudonymiser.scrub_value``).
    Returns:
      (kept fields, number of fields dropped because the schema does not declare them, at any
      level the schema describes).
    """
    if not isinstance(record, Mapping):
        return {}, 0
    by_name = {f.name: f for f in fields}
    kept: dict[str, Any] = {}
    dropped = sum(1 for name in record if name not in by_name)
    for f in fields:
        if f.name not in record:
            continue
        value = record[f.name]
        if f.identifying or f.free_text:
            kept[f.name] = pseudonym(value) if isinstance(value, str) else (
                None if value is None else f"(value withheld: identifies a patient; {type(value).__name__})")
        elif f.repeated:
            if not isinstance(value, (list, tuple)):
                kept[f.name] = f"(value withheld: {type(value).__name__})"
                continue
            items = []
            for item in value[:MAX_ITEMS]:
                if f.type == RECORD:
                    item_kept, item_dropped = allowed_payload(f.fields, item, pseudonym)
                    dropped += item_dropped
                    items.append(item_kept if isinstance(item, Mapping) else f"(value withheld: {type(item).__name__})")
                else:
                    items.append(_allowed_scalar(f, item))
            kept[f.name] = items
            if len(value) > MAX_ITEMS:
                kept[f"{f.name}_not_shown"] = len(value) - MAX_ITEMS
        elif f.type == RECORD:
            sub_kept, sub_dropped = allowed_payload(f.fields, value, pseudonym)
            dropped += sub_dropped
            kept[f.name] = sub_kept if isinstance(value, Mapping) or value is None else WITHHELD
        else:
            kept[f.name] = _allowed_scalar(f, value)
    return kept, dropped


def _payload_text(payload: Any) -> str:
    if isinstance(payload, bytes):
        text = payload.decode("utf-8", errors="replace")
    elif isinstance(payload, str):
        text = payload
    else:
        try:  # orjson: C, with its own depth limit (never a RecursionError)
            text = orjson.dumps(payload, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
        except (orjson.JSONEncodeError, TypeError):
            text = WITHHELD
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
    """One `dead_letters` row. Also counts it in the Beam metric ``dead_letters/<stage>``.

    `payload` must already be safe to keep (built by `allowed_payload`, or a validated record
    whose identifiers are pseudonyms); it is serialised and truncated here.
    """
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
