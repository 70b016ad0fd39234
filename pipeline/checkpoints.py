"""Signed checkpoints of the audit log: what lets `conclave audit verify` vouch for a record.

A hash chain alone proves nothing against whoever can write the stream: they can edit a record and
recompute everything after it. So `conclave serve` (the operator role, the only one that may read the audit
log) signs, every CHECKPOINT_INTERVAL_S, a checkpoint (schemas/audit.py: Checkpoint) of the entries
appended since the last one: their span, the chain value before and after it, and the stream's identity
(its created time, its retention configuration, its first sequence), with an Ed25519 key that only the
operator holds (`<home>/credentials/audit-signing.key`). Auditors pin its public key
(`conclave audit key`); editing, removing or reordering a signed entry, shortening retention or deleting the
stream then shows, without the key.

Checkpoints go to their own stream (CONCLAVE_AUDIT_CHECKPOINTS: file storage, no delete, no purge, kept
forever). Each continues the newest one signed by the same key, so signing resumes after a restart; when
entries aged out before they were signed, the next checkpoint starts a new segment of the chain (GENESIS
at the stream's first sequence) and says so. Failures are logged in one line and retried next round.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from pipeline.audit import WRONG_LAST_SEQUENCE, chain, read_entries, stored_messages, stream_facts
from pipeline.connection import sleep_unless
from pipeline.subjects import AUDIT_STREAM, CHECKPOINTS_STREAM, CHECKPOINTS_SUBJECT
from schemas.audit import GENESIS, Checkpoint, StreamFacts, canonical

log = logging.getLogger("conclave.checkpoints")
FORMAT = "conclave-audit-checkpoint/1"
KEY_FILE = "audit-signing.key"
MAX_SPAN = 10_000  # entries one checkpoint covers at most: a backlog is signed in several, each read bounded


class CheckpointError(RuntimeError):
    """This round cannot sign; the message says why (logged in one line, retried next round)."""


def checkpoints_stream_config() -> StreamConfig:
    """Checkpoints are kept forever and cannot be deleted or purged through NATS."""
    return StreamConfig(name=CHECKPOINTS_STREAM, subjects=[CHECKPOINTS_SUBJECT], storage=StorageType.FILE,
                        max_age=0, deny_delete=True, deny_purge=True)


# --- the key -----------------------------------------------------------------------------------------


def signing_key_path(home: Path) -> Path:
    return Path(home) / "credentials" / KEY_FILE


def load_signing_key(path: Path, create: bool) -> Ed25519PrivateKey:
    """The Ed25519 signing key in `path` (PKCS#8 PEM, mode 0600, its folder 0700); made there if missing and
    `create`. Raises FileNotFoundError if missing otherwise."""
    path = Path(path)
    if create and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption())
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile: use that one
            pass
        else:
            with os.fdopen(descriptor, "wb") as file:
                file.write(pem)
    for place, mode in ((path.parent, 0o700), (path, 0o600)):
        if stat.S_IMODE(place.stat().st_mode) & 0o077:
            log.warning("%s was readable by others (mode %o): set to %o", place, stat.S_IMODE(place.stat().st_mode),
                        mode)
            os.chmod(place, mode)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    return key


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """`ed25519:<base64 of the raw 32-byte public key>`: what auditors pin (`verify --public-key`)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """The key `public_key_text` wrote; raises ValueError for anything else."""
    kind, _, encoded = text.strip().partition(":")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raw = b""
    if kind != "ed25519" or len(raw) != 32:
        raise ValueError(f"not an audit public key (ed25519:<base64 of 32 bytes>): {text!r}")
    return Ed25519PublicKey.from_public_bytes(raw)


# --- signed checkpoints, as stored (pure) ------------------------------------------------------------


class Signed(msgspec.Struct):
    checkpoint: Checkpoint
    signed: bytes  # the RFC 8785 bytes of the checkpoint as stored: what the signature is over
    signature: bytes


def signed_message(key: Ed25519PrivateKey, checkpoint: Checkpoint) -> bytes:
    """`{"checkpoint":<RFC 8785 bytes>,"signature":"<base64 Ed25519 signature over them>"}`."""
    body = canonical(msgspec.to_builtins(checkpoint))
    signature = base64.b64encode(key.sign(body)).decode()
    return b'{"checkpoint":' + body + b',"signature":"' + signature.encode() + b'"}'


def read_signed(message: bytes) -> Signed:
    """A stored (or exported) checkpoint message; raises ValueError if it is not one. The signed bytes are
    the RFC 8785 form of its `checkpoint` value, parsed with numbers as IEEE doubles (as RFC 8785 has them)."""
    try:
        value = json.loads(message, parse_int=float)
        body = canonical(value["checkpoint"])
        signature = base64.b64decode(value["signature"], validate=True)
        checkpoint = msgspec.json.decode(body, type=Checkpoint)
    except (ValueError, KeyError, TypeError, msgspec.MsgspecError) as exc:
        raise ValueError(f"not a signed checkpoint ({exc})") from None
    if checkpoint.format != FORMAT:
        raise ValueError(f"not a signed checkpoint (format {checkpoint.format!r})")
    return Signed(checkpoint=checkpoint, signed=body, signature=signature)


def signature_ok(signed: Signed) -> bool:
    """Whether the checkpoint was signed by the key it names."""
    try:
        parse_public_key(signed.checkpoint.signer).verify(signed.signature, signed.signed)
        return True
    except (ValueError, InvalidSignature):
        return False


def config_digest(config: dict) -> str:
    return hashlib.sha256(canonical(config)).hexdigest()


def next_span(previous: Checkpoint | None, facts: StreamFacts) -> tuple[int, str, bool] | None:
    """(from_seq, chain_before, new_segment) of the next checkpoint, or None when nothing is new."""
    if previous is not None and previous.stream_created == facts.created and previous.to_seq + 1 >= facts.first_seq:
        if previous.to_seq > facts.last_seq:
            raise CheckpointError(f"{AUDIT_STREAM} ends at seq {facts.last_seq}, before the last checkpoint's "
                                  f"{previous.to_seq}: entries were removed from its end; not signing over that")
        start, before, new_segment = previous.to_seq + 1, previous.chain_after, False
    else:  # the first checkpoint, a stream made again, or entries that aged out before they were signed
        start, before, new_segment = max(facts.first_seq, 1), GENESIS, True
    if facts.messages == 0 or facts.last_seq < start:
        return None
    return start, before, new_segment


def make_checkpoint(facts: StreamFacts, start: int, before: str, new_segment: bool, entries: list,
                    to_seq: int, signer: str) -> Checkpoint:
    """The checkpoint of `entries` (pipeline/audit.py: Entry, in sequence order) over start..to_seq."""
    return Checkpoint(format=FORMAT, stream=facts.name, stream_created=facts.created, config=facts.config,
                      config_digest=config_digest(facts.config), max_age_s=facts.config.get("max_age_s", 0.0),
                      first_seq=facts.first_seq, last_seq=facts.last_seq, from_seq=start, to_seq=to_seq,
                      count=len(entries), chain_before=before, chain_after=chain(before, (e.data for e in entries)),
                      new_segment=new_segment, time=facts.time, signer=signer)


# --- signing (the operator's `conclave serve`) -------------------------------------------------------


async def read_checkpoint_messages(js: JetStreamContext) -> list[tuple[int, bytes]]:
    """Every stored checkpoint message, as (sequence, bytes). Raises NotFoundError without the stream."""
    return [(msg.seq or 0, msg.data or b"") async for msg in stored_messages(js, CHECKPOINTS_STREAM)]


async def latest_own(js: JetStreamContext, signer: str) -> tuple[int, Checkpoint | None]:
    """(the checkpoint stream's last sequence, the newest valid checkpoint `signer` signed in it)."""
    info = await js.stream_info(CHECKPOINTS_STREAM)
    last = info.state.last_seq
    async for msg in stored_messages(js, CHECKPOINTS_STREAM, info.state.first_seq, last, newest_first=True):
        try:
            signed = read_signed(msg.data or b"")
        except ValueError:
            continue
        if signed.checkpoint.signer == signer and signature_ok(signed):
            return last, signed.checkpoint
    return last, None


async def sign_new_entries(js: JetStreamContext, key: Ed25519PrivateKey,
                           stopping: asyncio.Event | None = None) -> list[Checkpoint]:
    """Sign checkpoints until every entry appended so far is covered (or `stopping` is set between two);
    returns those signed."""
    signer = public_key_text(key)
    last_message, previous = await latest_own(js, signer)
    signed = []
    while stopping is None or not stopping.is_set():
        facts = await stream_facts(js)
        span = next_span(previous, facts)
        if span is None:
            return signed
        start, before, new_segment = span
        to_seq = min(facts.last_seq, start + MAX_SPAN - 1)
        entries = [entry async for entry in read_entries(js, start, to_seq)]
        read = {entry.seq for entry in entries}
        gap = next((seq for seq in range(start, to_seq + 1) if seq not in read), None)
        if gap is not None and (await stream_facts(js)).first_seq > gap:
            # Aged out while being read: a checkpoint without it would misstate what the stream held.
            raise CheckpointError(f"seq {gap} aged out while being read; the next round starts a new segment")
        checkpoint = make_checkpoint(facts, start, before, new_segment, entries, to_seq, signer)
        try:
            ack = await js.publish(CHECKPOINTS_SUBJECT, signed_message(key, checkpoint), stream=CHECKPOINTS_STREAM,
                                   headers={"Nats-Expected-Last-Subject-Sequence": str(last_message)})
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise CheckpointError("another signer appended a checkpoint meanwhile; retrying next round") from None
            raise
        last_message, previous = ack.seq, checkpoint
        signed.append(checkpoint)
    return signed


def jetstream(connection) -> JetStreamContext:
    """A JetStreamContext from one, a nats-py Client, or a pipeline/connection.py Link (its current one)."""
    if isinstance(connection, JetStreamContext):
        return connection
    nc = getattr(connection, "nc", connection)
    if nc is None:
        raise CheckpointError("no NATS connection")
    return nc.jetstream()


async def keep_checkpointing(connection, key: Ed25519PrivateKey, interval_s: float, stopping: asyncio.Event) -> None:
    """Every `interval_s` until `stopping` is set, sign checkpoints of the entries appended since the last
    one (`connection`: see `jetstream`). Never raises: each failed round is one log line."""
    while not stopping.is_set():
        try:
            for checkpoint in await sign_new_entries(jetstream(connection), key, stopping):
                log.debug("signed audit checkpoint of seq %d..%d", checkpoint.from_seq, checkpoint.to_seq)
        except asyncio.CancelledError:
            raise
        except NotFoundError as exc:
            log.warning("audit checkpoint not signed: a stream is missing (%s)", exc.description or exc)
        except Exception as exc:
            log.warning("audit checkpoint not signed: %s", f"{type(exc).__name__}: {exc}".rstrip(": "))
        await sleep_unless(stopping, interval_s)
