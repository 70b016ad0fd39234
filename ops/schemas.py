"""`conclave schemas`: the NATS job API's message types as JSON Schema, for non-Python submitters."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from schemas.audit import AuditRecord
from schemas.jobs import Cancel, Event, Job, WorkerStatus

MESSAGES = {"job": Job, "event": Event, "cancel": Cancel, "worker-status": WorkerStatus, "audit-record": AuditRecord}


def schema_texts() -> dict[str, str]:
    """File name -> JSON Schema text, for every message type on the NATS API."""
    return {f"{name}.schema.json": json.dumps(msgspec.json.schema(type_), indent=2) + "\n"
            for name, type_ in MESSAGES.items()}


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_texts().items():
        (out / name).write_text(text)
        written.append(out / name)
    return written
