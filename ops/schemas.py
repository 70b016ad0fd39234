"""`conclave schemas`: the NATS job API's message types as JSON Schema, for non-Python submitters."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from schemas.jobs import Cancel, Event, Job, WorkerStatus


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, type_ in {"job": Job, "event": Event, "cancel": Cancel, "worker-status": WorkerStatus}.items():
        path = out / f"{name}.schema.json"
        path.write_text(json.dumps(msgspec.json.schema(type_), indent=2) + "\n")
        written.append(path)
    return written
