"""The dashboard's audit view: the latest records, one record whole, and the verdict on the log's chain.

Read over NATS as the `auditor` role (pipeline/access.py), which only `conclave serve` has: the first machine's
dashboard shows the audit log; a joined node's answers 404 `audit_unavailable` and says where it is. Behind the API
key like every /v1 route, and every key sees it all, prompts and answers included (README: Dashboard).

Verifying reads the whole log and checks it as `conclave audit verify` does (pipeline/audit_verify.py), pinned to
this deployment's signing key: one verification at a time, however many pages ask.
"""

from __future__ import annotations

import asyncio
import re
import time

import msgspec
from nats.js.errors import NotFoundError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ingress.errors import APIError
from pipeline.access import Identity
from pipeline.audit import NOT_A_RECORD, decode_record, stored_messages
from pipeline.audit_read import read_audit_log
from pipeline.audit_verify import verify_log
from pipeline.connection import Link
from pipeline.subjects import AUDIT_PREFIX, AUDIT_STREAM
from schemas.audit import AuditRecord

LISTED = 50  # records a page lists unless it asks for another number
MOST_LISTED = 500
FINDINGS_SHOWN = 50
NUMBER = re.compile(r"[0-9]{1,19}")  # ASCII digits only (str.isdigit takes "²", which int() refuses), at most 2**63


def summary(seq: int, record: AuditRecord) -> dict:
    """A record's line in the list: who, which model, what came of it, how many tokens, how fast."""
    usage = record.usage
    return {"seq": seq, "time": record.time, "job_id": record.job_id, "model": record.model, "caller": record.caller,
            "submitter": record.submitter, "source": record.source, "outcome": record.outcome,
            "finish_reason": record.finish_reason, "error": record.error.code if record.error else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "ttft_ms": record.ttft_ms, "duration_ms": record.duration_ms}


class AuditReader:
    """The auditor's NATS link and what the dashboard asks of it."""

    def __init__(self, nats_url: str, identity: Identity, pinned_key: str | None, on_record):
        self.pinned_key = pinned_key  # the deployment's checkpoint signing key (public), which verify trusts
        self.on_record = on_record  # called with each record's summary as it is stored (the live view)
        self.verifying: asyncio.Task | None = None
        self.link = Link(nats_url, "conclave-dashboard-auditor", identity, on_open=self.on_open)

    async def on_open(self, nc) -> None:
        async def stored(msg):
            try:
                self.on_record(summary(0, decode_record(msg.data)))  # its sequence is not known yet: 0
            except NOT_A_RECORD:
                pass  # not a record: verify reports it
        await nc.subscribe(f"{AUDIT_PREFIX}.>", cb=stored)

    async def latest(self, limit: int) -> list[dict]:
        found = []
        async for msg in stored_messages(self.link.nc.jetstream(), AUDIT_STREAM, newest_first=True):
            try:
                found.append(summary(msg.seq or 0, decode_record(msg.data or b"")))
            except NOT_A_RECORD:
                continue
            if len(found) == limit:
                break
        return found

    async def record(self, seq: int) -> dict:
        msg = await self.link.nc.jetstream().get_msg(AUDIT_STREAM, seq)
        return {"seq": seq, "subject": msg.subject, "record": msgspec.json.decode(msg.data or b"{}")}

    async def verify(self) -> dict:
        """The verdict of a verification started now, or of the one running: asks that arrive while one runs share
        its answer rather than each reading the whole log again."""
        if self.verifying is None or self.verifying.done():
            self.verifying = asyncio.create_task(self.verified())
        return await asyncio.shield(self.verifying)

    async def verified(self) -> dict:
        started = time.monotonic()
        log = await read_audit_log(self.link.nc.jetstream())
        # In a thread: checking a long log is seconds of CPU, which would stall every request of this ingress.
        verdict = await asyncio.to_thread(verify_log, log.entries, log.checkpoints, log.stream,
                                          stream_missing=log.stream is None, pinned=self.pinned_key)
        result = "broken" if verdict.broken else "vouched" if verdict.exit_code == 0 else "not vouched"
        return {"result": result, "entries": verdict.entries, "records": verdict.records,
                "vouched": verdict.vouched, "unvouched": verdict.unvouched, "checkpoints": verdict.checkpoints,
                "signers": verdict.signers, "pinned": self.pinned_key, "lines": verdict.lines(),
                "findings": [{"level": f.level, "text": f.text, "seq": f.seq} for f in verdict.findings[:FINDINGS_SHOWN]],
                "seconds": round(time.monotonic() - started, 3)}


def reader_of(request: Request) -> AuditReader:
    reader = request.app.state.ingress.audit
    if reader is None:
        raise APIError(404, "This node does not read the audit log: its first machine's dashboard shows it (only "
                       "`conclave serve` holds the auditor's key).", code="audit_unavailable")
    return reader


def unreadable(exc: Exception) -> APIError:
    return APIError(503, f"The audit log cannot be read right now ({type(exc).__name__}).", type="server_error",
                    code="nats_unavailable")


async def list_records(request: Request) -> Response:
    """`GET /v1/audit/records?limit=N`: the newest records first (N: 1 to 500, default 50)."""
    reader = reader_of(request)
    raw = request.query_params.get("limit", str(LISTED))
    if not NUMBER.fullmatch(raw) or not 1 <= int(raw) <= MOST_LISTED:
        raise APIError(400, f"`limit` must be a whole number from 1 to {MOST_LISTED}.", param="limit",
                       code="invalid_value")
    try:
        records = await reader.latest(int(raw))
    except NotFoundError:  # no audit stream yet: nothing was answered
        records = []
    except Exception as exc:
        raise unreadable(exc) from None
    return JSONResponse({"object": "list", "data": records})


async def get_record(request: Request) -> Response:
    """`GET /v1/audit/records/{seq}`: the record stored at that sequence of the audit stream, whole."""
    reader = reader_of(request)
    raw = request.path_params["seq"]
    if not NUMBER.fullmatch(raw) or int(raw) < 1:
        raise APIError(400, "A record is named by its sequence in the audit log: a whole number from 1.",
                       param="seq", code="invalid_value")
    try:
        return JSONResponse(await reader.record(int(raw)))
    except NotFoundError:
        raise APIError(404, f"The audit log holds no record at sequence {raw}.", code="not_found") from None
    except msgspec.DecodeError:
        raise APIError(422, f"The entry at sequence {raw} is not JSON: `conclave audit verify` reports it.",
                       code="not_a_record") from None
    except Exception as exc:
        raise unreadable(exc) from None


async def verify(request: Request) -> Response:
    """`POST /v1/audit/verify`: the whole log checked against its signed checkpoints, as `conclave audit verify`."""
    reader = reader_of(request)
    try:
        return JSONResponse(await reader.verify())
    except Exception as exc:
        raise unreadable(exc) from None
