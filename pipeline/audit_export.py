"""The audit log's export: one self-contained JSONL file an auditor verifies without access to the cluster.

Line 1 is a header with the audit stream's information when it was exported; then every entry in
sequence order, with its stored bytes reproducible exactly; then every checkpoint message as stored.
docs/audit.md describes the format for readers written in any language.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import msgspec
import rfc8785

from pipeline.audit import Entry
from pipeline.audit_verify import BROKEN, Verdict, verify_log
from schemas.audit import StreamFacts, canonical

EXPORT_KEY = "conclave_audit_export"


@dataclass
class Export:
    stream: StreamFacts | None = None
    stream_missing: bool = False
    entries: list[Entry] = field(default_factory=list)
    checkpoints: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()


def is_canonical(data: bytes) -> bool:
    """Whether `data` is the RFC 8785 form of the JSON it holds (numbers parsed as doubles, as RFC 8785 has
    them), so an export may carry it as a JSON value and a reader still reproduces the exact bytes."""
    try:
        return rfc8785.dumps(json.loads(data, parse_int=float)) == data
    except (ValueError, RecursionError):
        return False


def entry_line(entry: Entry) -> bytes:
    """`{"seq":N,"subject":S,"record":<the stored bytes>}` when they are RFC 8785 JSON, else the stored
    bytes as a JSON string (`"text"`, UTF-8) or in base64 (`"base64"`)."""
    head = b'{"seq":' + str(entry.seq).encode() + b',"subject":' + _string(entry.subject)
    if is_canonical(entry.data):
        return head + b',"record":' + entry.data + b"}"
    try:
        return head + b',"text":' + _string(entry.data.decode("utf-8")) + b"}"
    except UnicodeDecodeError:
        return head + b',"base64":"' + base64.b64encode(entry.data) + b'"}'


def export_lines(stream: StreamFacts | None, entries: Iterable[Entry], checkpoint_messages: Iterable[bytes],
                 stream_missing: bool = False) -> Iterator[bytes]:
    """The export, line by line (each ends with b"\\n"): a header with the stream's information, every
    entry in sequence order, then every checkpoint message as stored."""
    header = {EXPORT_KEY: 1, "stream": msgspec.to_builtins(stream) if stream else None,
              "stream_missing": stream_missing}
    yield canonical(header) + b"\n"
    for entry in entries:
        yield entry_line(entry) + b"\n"
    for message in checkpoint_messages:
        if b"\n" in message or b"\r" in message or not is_json_object(message):
            message = b'{"checkpoint_message_base64":"' + base64.b64encode(message) + b'"}'
        yield message + b"\n"


def is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False


def parse_export(data: bytes) -> Export:
    """An export as written by `export_lines`. Lines are split on b"\\n" only: a prompt may hold U+2028,
    U+2029 or U+0085, which str.splitlines() would take for line ends."""
    export = Export()
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_int=float)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            if EXPORT_KEY in value:
                stream = value.get("stream")
                export.stream = msgspec.json.decode(canonical(stream), type=StreamFacts) if stream else None
                export.stream_missing = bool(value.get("stream_missing"))
            elif "checkpoint" in value:
                export.checkpoints.append(line.rstrip(b"\r"))
            elif "checkpoint_message_base64" in value:
                export.checkpoints.append(base64.b64decode(value["checkpoint_message_base64"], validate=True))
            elif "seq" in value:
                if "record" in value:
                    raw = canonical(value["record"])
                elif "text" in value:
                    raw = value["text"].encode("utf-8")
                else:
                    raw = base64.b64decode(value["base64"], validate=True)
                export.entries.append(Entry(seq=int(value["seq"]), subject=str(value.get("subject", "")), data=raw))
            else:
                raise ValueError("neither an entry nor a checkpoint")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, msgspec.MsgspecError) as exc:
            export.problems.append(f"line {number} of the export is damaged ({exc})")
    return export


def verify_export(data: bytes, pinned: str | None = None, now: float | None = None) -> Verdict:
    """`verify_log` over an export's bytes; a damaged line is itself a finding."""
    export = parse_export(data)
    verdict = verify_log(export.entries, export.checkpoints, export.stream, stream_missing=export.stream_missing,
                         pinned=pinned, now=now)
    for problem in export.problems:
        verdict.add(BROKEN, problem)
    return verdict
