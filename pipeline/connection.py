"""NATS connections that report what happens to them in one line each and come back by themselves.

nats-py reconnects by itself after a network error or a server restart (forever, here), resubscribing
and flushing what was published meanwhile. It does not after an error the server reports (`-ERR`:
a payload over the limit, an authorization change): it closes the connection for good. `connect`
hands that case to `on_closed` (which also runs after an orderly close: the caller knows which it
was); a worker exits and its supervisor restarts it, the ingress opens a new connection (`Link`).

nats-py's default error callback logs a traceback for every failed reconnect attempt (one every
2 s while the server is down); these callbacks log one line when the connection is lost, one when it
is back, and nothing in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from typing import Awaitable, Callable, TypeVar

import nats
from nats.aio.client import Client
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from pipeline.access import Identity, is_inbox

log = logging.getLogger("conclave.nats")

JETSTREAM_UNAVAILABLE = 10008  # "JetStream system temporarily unavailable": a restart, a leader election
T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """Whether `exc` means "NATS is unreachable right now" (a restart, a network blip), worth retrying.
    JetStream answers 503 for a full stream too (10077, "maximum messages per subject exceeded"): that
    one is an answer, not an outage."""
    if isinstance(exc, ServiceUnavailableError):
        return exc.err_code in (None, JETSTREAM_UNAVAILABLE)
    return isinstance(exc, (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                            nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
                            NoStreamResponseError))


async def persist(operation: Callable[[], Awaitable[T]], deadline_s: float) -> T:
    """`operation()`, retried with backoff while NATS is unreachable, for up to `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    pause = 0.1
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + pause > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


async def answer(msg, data: bytes) -> None:
    """Answer a request, only into an inbox (pipeline/access.py: `is_inbox` says why); a request that names any
    other reply subject is dropped, with a line in the log at most once a minute (the CA reader's key is public, so
    anyone on the network may send such requests as fast as it likes)."""
    global _unanswered_said
    if is_inbox(msg.reply):
        await msg.respond(data)
    elif time.monotonic() >= _unanswered_said + 60.0:
        _unanswered_said = time.monotonic()
        log.warning("a request on %s named %r as its reply subject, not an inbox: not answered (such requests are "
                    "said at most once a minute)", msg.subject, (msg.reply or "")[:200])


_unanswered_said = -60.0  # when `answer` last said it refused one (monotonic): its log's pace, the process's alone


async def sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    """A background loop's pause: `seconds`, or less once `stopping` is set."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


async def sleep_until_any(seconds: float, *events: asyncio.Event, task: asyncio.Task | None = None) -> None:
    """A pause of `seconds`, or less once one of `events` is set or `task` has ended (it is not cancelled here). At
    least one event or a task: `sleep_unless` is the pause for one event."""
    wakes = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait([*wakes, *([task] if task is not None else [])], timeout=seconds,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wake in wakes:
            wake.cancel()


def quiet_tls_eof_warning() -> None:
    """asyncio warns at every TLS connection's end that nats-py's transport asks to stay half-open (TLS cannot):
    harmless, and one line per connection on a cluster's broker would drown the real ones. Only that is muted."""
    logging.getLogger("asyncio").addFilter(lambda record: "eof_received()" not in record.getMessage())


def servers(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222`: every server of a NATS cluster, for nats-py's pool (it fails over between
    them, and learns the rest of the cluster from the servers themselves)."""
    return [part.strip() for part in url.split(",") if part.strip()]


def redacted(url: str) -> str:
    """`url` without a user name or password in it, for logs and messages (a NATS URL may carry them)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=f"***@{parts.hostname}{':' + str(parts.port) if parts.port else ''}").geturl()


async def connect(url: str, name: str, identity: Identity, on_closed: Callable[[], Awaitable[None]] | None = None,
                  **options) -> Client:
    """A nats-py connection as `identity` that reconnects forever after network errors and restarts of the
    server."""
    nc = Client()
    shown = redacted(url)
    down = asyncio.Event()

    async def disconnected():
        if not nc.is_closed and not down.is_set():
            log.warning("%s: lost the connection to NATS at %s; reconnecting", name, shown)
            down.set()

    async def reconnected():
        down.clear()
        log.info("%s: reconnected to NATS at %s", name, shown)

    async def error(exc: Exception):
        if not down.is_set():  # while down, every reconnect attempt fails: said once already
            log.warning("%s: NATS error: %s", name, exc or type(exc).__name__)

    async def closed():  # also after an orderly close(): `on_closed` tells the two apart
        if on_closed is not None:
            await on_closed()

    await nc.connect(servers(url), name=name, max_reconnect_attempts=-1, reconnect_time_wait=1, error_cb=error,
                     disconnected_cb=disconnected, reconnected_cb=reconnected, closed_cb=closed,
                     **identity.connect_options(), **options)
    return nc


class NatsUnreachable(RuntimeError):
    """A command could not reach NATS; the message says where it tried."""


async def connect_once(url: str, name: str, identity: Identity, timeout_s: float = 5.0) -> Client:
    """A connection for a short command (`conclave audit`): it fails within seconds, in one line, when
    nothing answers at `url`, rather than retrying for minutes with a traceback per try."""
    async def quiet(exc):
        pass

    try:
        return await asyncio.wait_for(nats.connect(servers(url), name=name, connect_timeout=2, allow_reconnect=False,
                                                   error_cb=quiet, **identity.connect_options()), timeout_s)
    except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
        raise NatsUnreachable(f"cannot reach NATS at {redacted(url)} as {identity.role} ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})") from None


class Link:
    """A NATS connection that is replaced by a new one when the server closes it for good.

    `on_open(nc)` runs on every new connection (subscriptions that must always exist). Requests in
    flight on a connection that closed fail; later ones use the new connection (`link.nc`).
    """

    def __init__(self, url: str, name: str, identity: Identity,
                 on_open: Callable[[Client], Awaitable[None]] | None = None):
        self.url = url
        self.name = name
        self.identity = identity
        self.on_open = on_open
        self.nc: Client | None = None
        self.stopped = False
        self.replacing: asyncio.Task | None = None

    async def open(self) -> None:
        opened = []

        async def closed() -> None:  # only the current connection's end matters
            if opened and opened[0] is self.nc:
                await self._closed()

        nc = await connect(self.url, self.name, self.identity, on_closed=closed)
        opened.append(nc)
        try:
            if self.on_open is not None:
                await self.on_open(nc)
        except BaseException:
            await nc.close()
            raise
        self.nc = nc

    async def _closed(self) -> None:
        if not self.stopped and self.replacing is None:
            log.error("%s: NATS closed the connection (%s); opening a new one", self.name,
                      self.nc.last_error if self.nc else "while connecting")
            self.replacing = asyncio.create_task(self._replace())

    async def _replace(self) -> None:
        pause = 0.5
        while not self.stopped:
            try:
                await self.open()
                log.info("%s: opened a new connection to NATS", self.name)
                break
            except Exception as exc:
                log.warning("%s: could not reconnect to NATS (%s); retrying in %.0fs", self.name, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
        self.replacing = None

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def close(self) -> None:
        self.stopped = True
        if self.replacing is not None:
            self.replacing.cancel()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()
