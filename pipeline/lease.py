"""One controller at a time: a lease in the control bucket, taken by whoever finds it free or abandoned.

Candidates are the first machine's `serve --cluster` and, with three brokers, the two broker nodes
(ops/brokers.py): the machines that keep the cluster's state. The holder rewrites the lease every RENEW_S, each
write checked against the revision it last wrote (JetStream's expected-last-sequence, the bucket's compare and
set), so two writers cannot both succeed. A candidate that sees the same revision for LEASE_S takes it by
writing over exactly that revision; if another was faster, its write fails and it keeps waiting.

Abandonment is judged on the candidate's own monotonic clock (how long the revision has not moved), never by
comparing its clock with the holder's or the broker's: machines' clocks differ by any amount. A holder that
has not renewed within LEASE_S - RENEW_S of sending its last good renewal (cut off from the brokers) stops
controlling before anyone may take over, so two controllers never order the same agents at once (`_hold`). The
plan the controller follows (what to serve, with which settings) is in the same bucket, written by the first
machine (`change_plan`), so a successor places the models as the first machine was told to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import msgspec
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, NotFoundError

from pipeline.audit import WRONG_LAST_SEQUENCE
from pipeline.connection import sleep_unless, sleep_until_any
from pipeline.subjects import CONTROL_BUCKET, CONTROL_PREFIX, CONTROL_STREAM
from pipeline.limits import UNDECODABLE
from schemas.membership import ControllerPlan, Lease

log = logging.getLogger("conclave.lease")
LEASE_S = 10.0  # longer than a JetStream leader election, which a holder waits out
RENEW_S = 1.0
LEASE_SUBJECT = f"{CONTROL_PREFIX}.lease"
PLAN_SUBJECT = f"{CONTROL_PREFIX}.plan"


def control_bucket_config() -> KeyValueConfig:
    return KeyValueConfig(bucket=CONTROL_BUCKET, history=1, storage=StorageType.FILE, direct=True)


async def _last(js, subject: str):
    try:
        return await js.get_last_msg(CONTROL_STREAM, subject, direct=True)
    except NotFoundError:
        return None


async def change_plan(js, change: Callable[[ControllerPlan | None], ControllerPlan]) -> ControllerPlan:
    """Read the plan from the stream's leader (a direct get may come from a replica a moment behind), apply
    `change`, and write the result over exactly what was read (compare and set); read again when another write came
    between. Nothing is written when `change` leaves the plan as it was; what `change` raises is raised."""
    for _ in range(5):
        try:
            msg = await js.get_last_msg(CONTROL_STREAM, PLAN_SUBJECT)
        except NotFoundError:
            msg = None
        plan = decode_plan(msg.data if msg is not None else None)
        changed = change(plan)
        if changed == plan:
            return plan
        headers = {"Nats-Expected-Last-Subject-Sequence": str(msg.seq if msg is not None else 0)}
        try:
            await js.publish(PLAN_SUBJECT, msgspec.json.encode(changed), stream=CONTROL_STREAM, headers=headers)
            return changed
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
    raise RuntimeError("the plan kept changing under this write")


def decode_plan(data: bytes | None) -> ControllerPlan | None:
    try:
        return msgspec.json.decode(data, type=ControllerPlan) if data else None
    except UNDECODABLE:  # an earlier version's, or not JSON: the first machine's `serve` replaces it as it
        return None  # starts (and a change of the plan writes over it), where raising here would stop both


async def read_plan(js) -> ControllerPlan | None:
    """The plan; None before the first machine wrote one, or while the one there is an earlier version's (the first
    machine's `serve` writes its own when it starts)."""
    msg = await _last(js, PLAN_SUBJECT)
    return decode_plan(msg.data if msg is not None else None)


async def read_lease(js) -> Lease | None:
    msg = await _last(js, LEASE_SUBJECT)
    try:
        return msgspec.json.decode(msg.data, type=Lease) if msg is not None and msg.data else None
    except UNDECODABLE:
        return None


async def _write(js, data: bytes, over: int, timeout_s: float = 5.0, delete: bool = False) -> int | None:
    """Write the lease (or its deletion) over revision `over` (0: none yet); its new revision, or None when another
    wrote first."""
    headers = {"Nats-Expected-Last-Subject-Sequence": str(over), **({"KV-Operation": "DEL"} if delete else {})}
    try:
        return (await js.publish(LEASE_SUBJECT, data, stream=CONTROL_STREAM, headers=headers, timeout=timeout_s)).seq
    except APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            return None
        raise


async def _take(link, lease: Lease, stopping: asyncio.Event, first: bool) -> tuple[int, float] | None:
    """Wait until the lease is free or abandoned and take it: its revision and when the winning write was sent
    (monotonic), or None once `stopping`. One nobody held yet only if `first`."""
    seen, since, said = None, time.monotonic(), False
    while not stopping.is_set():
        try:
            msg = await _last(link.nc.jetstream(), LEASE_SUBJECT)
            revision = msg.seq if msg is not None else 0
            if revision != seen:
                seen, since = revision, time.monotonic()
            given_up = (msg is None and first) or (msg is not None and not msg.data)  # or deleted by a holder
            if given_up or (msg is not None and time.monotonic() - since >= LEASE_S):
                sent = time.monotonic()
                taken = await _write(link.nc.jetstream(), msgspec.json.encode(lease), revision)
                if taken is not None:
                    return taken, sent
            elif not said:
                holder = await read_lease(link.nc.jetstream())
                log.info("the controller runs on %s; this one stands by", holder.host if holder else "the first machine")
                said = True
        except Exception as exc:  # the brokers away a moment (or electing a leader): keep asking
            log.debug("could not read the controller lease: %s", exc)
            seen = None  # abandoned means unchanged for LEASE_S *seen*: the holder could not write meanwhile either
        await sleep_unless(stopping, RENEW_S)
    return None


async def lead(link, lease: Lease, stopping: asyncio.Event, work: Callable[[asyncio.Event], Awaitable[None]],
               first: bool = False) -> None:
    """Until `stopping`: take the lease, run `work(lost)` while it is held, and give it up when `stopping`; `lost`
    is set when the lease is lost or given up, and `work` must then end. A `work` that ends by itself (it cannot
    control: say, a model this machine does not have, or a plan that changed) gives the lease up, and lets another
    candidate try first. `first`: the first machine's `serve`, the only one to take a lease nobody held yet (the
    others wait for it: a cluster starts controlled where it was set up, once its plan is written)."""
    while not stopping.is_set():
        taken = await _take(link, lease, stopping, first)
        if taken is None:
            return
        log.info("this machine (%s) holds the controller lease now", lease.host)
        lost = asyncio.Event()
        working = asyncio.create_task(work(lost))
        revision = await _hold(link, lease, *taken, stopping, working)
        by_itself = working.done()
        lost.set()
        (ended,) = await asyncio.gather(working, return_exceptions=True)
        if isinstance(ended, Exception):
            log.error("the controller failed: %s", ended, exc_info=ended)
        if revision is not None and (stopping.is_set() or by_itself):
            try:  # handed over at once (a successor need not wait LEASE_S), unless another holds it by now
                await _write(link.nc.jetstream(), b"", revision, timeout_s=2.0, delete=True)
            except Exception:
                pass
        if by_itself:
            await sleep_unless(stopping, LEASE_S)


async def _hold(link, lease: Lease, revision: int, sent: float, stopping: asyncio.Event,
                working: asyncio.Task) -> int | None:
    """Renew the lease every RENEW_S while `working` runs and until `stopping`; the last revision written, or None
    once it is lost: another took it, or no renewal succeeded within LEASE_S - RENEW_S of sending the last one
    that did. A candidate takes over only LEASE_S after it first saw that one's revision, which was after it was
    sent: this holder has stopped by then, whatever its clock and the candidate's say."""
    data = msgspec.json.encode(lease)
    while not stopping.is_set() and not working.done():
        await sleep_until_any(RENEW_S, stopping, task=working)
        if stopping.is_set() or working.done():
            break
        deadline, now = sent + LEASE_S - RENEW_S, time.monotonic()
        if now >= deadline:
            log.warning("could not renew the controller lease for %.0fs: this one stops controlling",
                        LEASE_S - RENEW_S)
            return None
        try:
            written = await _write(link.nc.jetstream(), data, revision, timeout_s=deadline - now)
        except Exception as exc:  # the brokers away, or electing a leader: again, until the deadline
            log.debug("could not renew the controller lease: %s", exc)
            continue
        if written is None:
            log.warning("another controller took the lease: this one stops controlling")
            return None
        revision, sent = written, now
    return revision
