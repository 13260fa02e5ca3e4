"""Renders the data model (every input stream and output table) as Markdown from the contract.

    python -m schemas.docs > docs/DATA_MODEL.md

`tests/test_schemas.py` fails when docs/DATA_MODEL.md is not what this prints.
"""

from __future__ import annotations

import sys

from schemas.contract import RECORD, Field, RecordDef, bigquery_table_options
from schemas.inputs import INPUT_STREAMS
from schemas.outputs import OUTPUT_TABLES

_TYPE_NAMES = {"string": "STRING", "int": "INT64", "float": "FLOAT64", "bool": "BOOL", "timestamp": "TIMESTAMP"}


def _type(field: Field) -> str:
    if field.type == RECORD:
        name = f"RECORD {field.record_name or field.name}"
    else:
        name = _TYPE_NAMES[field.type]
    return f"ARRAY<{name}>" if field.repeated else name


def _rule(field: Field) -> str:
    rules = []
    if field.minimum is not None or field.maximum is not None:
        rules.append(f"{field.minimum:g} – {field.maximum:g}" if field.maximum is not None
                     else f"≥ {field.minimum:g}")
    if field.choices:
        rules.append(" / ".join(field.choices))
    if field.min_length:
        rules.append("non-empty")
    return "; ".join(rules)


def _rows(fields, prefix="") -> list[str]:
    rows = []
    for f in fields:
        mode = "repeated" if f.repeated else ("nullable" if f.nullable else "required")
        rows.append(f"| `{prefix}{f.name}` | {_type(f)} | {mode} | {_rule(f)} | {f.doc} |")
        if f.type == RECORD:
            rows.extend(_rows(f.fields, prefix=f"{prefix}{f.name}[]."))
    return rows


def _section(title: str, record: RecordDef) -> list[str]:
    lines = [f"### {title}", "", record.doc, ""]
    options = bigquery_table_options(record)
    if options:
        partition = options.get("timePartitioning", {}).get("field")
        clustering = ", ".join(options.get("clustering", {}).get("fields", []))
        lines += [f"Partitioned by day of `{partition}` (Parquet: `date=` folders); clustered by {clustering}.", ""]
    lines += ["| field | type | mode | valid values | meaning |", "|---|---|---|---|---|"]
    return lines + _rows(record.fields) + [""]


def render_markdown() -> str:
    lines = [
        "# medtwin data model",
        "",
        "Generated from `schemas/` by `python -m schemas.docs`; do not edit by hand.",
        "Avro (inputs), Parquet and BigQuery schemas are all derived from these declarations.",
        "",
        "## Input streams",
        "",
    ]
    for stream, record in INPUT_STREAMS.items():
        lines += _section(f"`{stream}`: {record.name}", record)
    lines += ["## Output tables", ""]
    for name, record in OUTPUT_TABLES.items():
        lines += _section(f"`{name}`", record)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
