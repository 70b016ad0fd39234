"""Signed checkpoints, `conclave audit verify` and the export: what is vouched for, and the first thing that is not.

Mostly pure: logs are built and signed in memory (the helpers of tests/test_audit_log.py), tampered with, and
checked with the same functions `conclave audit verify` uses. The rest run against a real nats-server (the
`bare_nats` fixture: an authenticated server, an operator's connection).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import time

import msgspec
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.audit import Entry, append_record, chain, read_entries, record_for, stream_facts
from pipeline.audit_export import export_lines, verify_export
from pipeline.audit_verify import BROKEN, NOTE, UNVOUCHED, iso, verify_log
from pipeline.checkpoints import (keep_checkpointing, load_signing_key, parse_public_key, public_key_text,
                                  read_checkpoint_messages, read_signed, sign_new_entries, signed_message)
from pipeline.subjects import AUDIT_STREAM, CHECKPOINTS_STREAM
from schemas.audit import GENESIS, AuditRecord
from tests.test_audit_log import (DAY, PUBLIC, T0, a_record, done, facts, findings, full_job, log_of, replace_data,
                                  sign, signed_log)

# --- verify: what it vouches for, and the first thing it cannot ------------------------------------------


def test_an_untouched_signed_log_is_vouched_for_and_unpinned_is_not_enough():
    entries, messages = signed_log()
    verdict = verify_log(entries, messages, facts(entries, T0 + 10), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.unvouched, verdict.checkpoints) == (0, 6, 0, 2)
    unpinned = verify_log(entries, messages, facts(entries, T0 + 10))
    assert unpinned.exit_code == 3 and any("not pinned" in text for text in findings(unpinned, NOTE))
    assert PUBLIC in "\n".join(unpinned.lines())
    for verdict in (verdict, unpinned):
        assert "intact" not in "\n".join(verdict.lines())


def test_an_edit_is_found_even_when_everything_a_writer_can_recompute_is_recomputed():
    entries, messages = signed_log()
    value = json.loads(entries[1].data)
    value["output"] = "Lyon."
    edited = replace_data(entries, 2, rfc8785.dumps(value))  # a perfectly canonical, decodable record
    verdict = verify_log(edited, messages, facts(edited, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 1
    assert any("seq 1..3 do not match checkpoint 1" in text for text in findings(verdict, BROKEN))
    assert verdict.vouched == 3  # the other checkpoint's span still holds

    # The chain value in the checkpoint recomputed too: its signature no longer holds.
    checkpoint = read_signed(messages[0]).checkpoint
    forged = msgspec.structs.replace(checkpoint, chain_after=chain(GENESIS, (e.data for e in edited[:3])))
    body = rfc8785.dumps(msgspec.to_builtins(forged))
    tampered = body.join([b'{"checkpoint":', b',"signature":' + json.dumps(json.loads(messages[0])["signature"])
                          .encode() + b"}"])
    verdict = verify_log(edited, [tampered, messages[1]], facts(edited, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("valid signature" in text for text in findings(verdict, BROKEN))

    # Re-signed with a key of the forger's own: not the pinned key, so nothing is vouched for (never 0).
    other = Ed25519PrivateKey.generate()
    resigned = [signed_message(other, msgspec.structs.replace(cp, signer=public_key_text(other)))
                for cp in (forged, read_signed(messages[1]).checkpoint)]
    verdict = verify_log(edited, resigned, facts(edited, T0 + 10), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (3, 0)
    assert any(public_key_text(other) in text and "not trusted" in text for text in findings(verdict, NOTE))


def test_records_cut_off_the_end_are_missing_not_intact():
    entries, messages = signed_log()
    export = b"".join(export_lines(facts(entries[:4], T0 + 10), entries[:4], messages))
    verdict = verify_export(export, pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 4
    assert any("seq 5..6 were cut off its end" in text for text in findings(verdict, BROKEN))
    # Also when the stream's header was dropped from the export along with them.
    lines = [line for line in export.split(b"\n") if line and b"conclave_audit_export" not in line]
    assert verify_export(b"\n".join(lines), pinned=PUBLIC).exit_code == 1


def test_an_export_cut_before_its_last_checkpoint_fails_only_against_a_kept_checkpoint():
    entries, messages = signed_log()  # checkpoints end at seq 3 and 6
    first, last = read_signed(messages[0]).checkpoint, read_signed(messages[1]).checkpoint
    whole = verify_export(b"".join(export_lines(facts(entries, T0 + 6), entries, messages)), pinned=PUBLIC)
    assert f"last checkpoint: ends at seq 6, signed {iso(last.time)}, chain value {last.chain_after}" in \
        whole.lines()[2]
    # Seq 4..6 and the checkpoint over them removed: an older complete export looks exactly the same.
    cut = b"".join(export_lines(facts(entries[:3], T0 + 3), entries[:3], messages[:1]))
    verdict = verify_export(cut, pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (0, 3), verdict.lines()
    assert f"ends at seq 3, signed {iso(first.time)}, chain value {first.chain_after}" in verdict.lines()[2]
    verdict.expect_seq(6)  # what the auditor kept from before
    assert verdict.exit_code == 1 and any("expected the log to reach seq 6" in text and "ends at seq 3" in text
                                          for text in findings(verdict, BROKEN)), verdict.lines()
    whole.expect_seq(6)
    assert whole.exit_code == 0 and "--expect-seq" not in whole.lines()[2]
    nothing = verify_log(entries, [], facts(entries, T0 + 10), pinned=PUBLIC)
    assert "last checkpoint: none trusted" in nothing.lines()
    nothing.expect_seq(1)
    assert nothing.exit_code == 1


def test_reordered_inserted_and_removed_entries_are_found():
    entries, messages = signed_log()
    swapped = replace_data(replace_data(entries, 4, entries[4].data), 5, entries[3].data)
    verdict = verify_log(swapped, messages, facts(swapped, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 4
    shifted = [*entries[:2], Entry(3, "conclave.audit.x", b"junk"),
               *(Entry(e.seq + 1, e.subject, e.data) for e in entries[2:])]
    verdict = verify_log(shifted, messages, facts(shifted, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 1
    removed = [e for e in entries if e.seq != 2]
    verdict = verify_export(b"".join(export_lines(None, removed, messages)), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("seq 2 is missing" in text for text in findings(verdict, BROKEN))


def test_a_foreign_message_stays_in_the_chain_and_is_reported():
    records = log_of(a_record("job-1"), a_record("job-2"))
    entries = [records[0], Entry(2, "conclave.audit.m.evil.x", b"not a record\n"),
               Entry(3, records[1].subject, records[1].data)]
    _, message = sign(entries, None, T0)
    export = b"".join(export_lines(facts(entries, T0), entries, [message]))
    verdict = verify_export(export, pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.unvouched, verdict.broken) == (3, 2, 1, False)
    assert verdict.first_unvouched.seq == 2 and "foreign message on conclave.audit.m.evil.x" in \
        verdict.first_unvouched.text


def test_records_after_the_last_checkpoint_and_without_any_are_not_vouched_for():
    entries, messages = signed_log(count=5)
    verdict = verify_log(entries, messages, facts(entries, T0 + 10), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.first_unvouched.seq) == (3, 3, 4)
    assert "after the last checkpoint" in verdict.first_unvouched.text
    nothing = verify_log(entries, [], facts(entries, T0 + 10), pinned=PUBLIC)
    assert (nothing.exit_code, nothing.vouched) == (3, 0)
    assert any("no signed checkpoints" in text for text in findings(nothing, NOTE))


def test_a_changed_stream_is_reported_against_the_checkpoints():
    entries, messages = signed_log()
    shortened = verify_log(entries, messages, facts(entries, T0 + 10, max_age_s=2.0), pinned=PUBLIC)
    assert shortened.exit_code == 1 and any("configuration changed" in text and "max_age_s" in text
                                            for text in findings(shortened, BROKEN))
    remade = verify_log(entries, messages, facts(entries, T0 + 10, created="2026-02-02T00:00:00+00:00"),
                        pinned=PUBLIC)
    assert remade.exit_code == 1 and any("deleted and made again" in text for text in findings(remade, BROKEN))
    deleted = verify_log([], messages, None, stream_missing=True, pinned=PUBLIC)
    assert deleted.exit_code == 1 and any("does not exist" in text for text in findings(deleted, BROKEN))
    # Kept forever, yet its first records are gone.
    verdict = verify_log(entries[3:], messages, facts(entries[3:], T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("seq 1..3" in text and "removed" in text
                                          for text in findings(verdict, BROKEN))
    # Bad signature, and a checkpoint missing from the middle.
    body = json.loads(messages[0])
    body["signature"] = base64.b64encode(bytes(64)).decode()
    verdict = verify_log(entries, [json.dumps(body).encode(), messages[1]], facts(entries, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 1
    entries9, messages9 = signed_log(count=9)
    verdict = verify_log(entries9, [messages9[0], messages9[2]], facts(entries9, T0 + 20), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("does not continue checkpoint 1" in text for text in findings(verdict, BROKEN))


def test_records_that_aged_out_are_told_apart_from_records_removed_too_early():
    entries, messages = signed_log(count=6, max_age_s=30 * DAY)
    kept = entries[3:]
    aged = verify_log(kept, messages, facts(kept, T0 + 60 * DAY, max_age_s=30 * DAY), pinned=PUBLIC)
    assert (aged.exit_code, aged.vouched) == (0, 3), aged.lines()
    assert any("seq 1..3" in text and "aged out" in text for text in findings(aged, NOTE))
    # Retention shortened to seconds and put back: the configuration matches again, but seq 4..6 were
    # appended after checkpoint 1 (T0 + 3) and are gone a day later, though they are kept for 30 days.
    checkpoint1, message1 = sign(entries[:3], None, T0 + 3, max_age_s=30 * DAY)
    _, message2 = sign(entries[:6], checkpoint1, T0 + 6, max_age_s=30 * DAY)
    later = log_of(a_record("job-7"), first=7)
    verdict = verify_log(later, [message1, message2], facts(later, T0 + DAY, max_age_s=30 * DAY), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("seq 4..6" in text and "before they could age out" in text
                                          for text in findings(verdict, BROKEN)), verdict.lines()


def test_entries_that_aged_out_unsigned_start_a_new_segment():
    entries = log_of(*(a_record(f"job-{i}") for i in range(1, 10)))
    checkpoint1, message1 = sign(entries[:3], None, T0, max_age_s=DAY)
    # Seq 4..5 aged out before the next round: it starts over from GENESIS at the stream's first sequence.
    checkpoint2, message2 = sign(entries[5:], checkpoint1, T0 + 2 * DAY, max_age_s=DAY)
    assert (checkpoint2.new_segment, checkpoint2.from_seq, checkpoint2.chain_before) == (True, 6, GENESIS)
    verdict = verify_log(entries[5:], [message1, message2], facts(entries[5:], T0 + 2 * DAY, max_age_s=DAY),
                         pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (0, 4), verdict.lines()
    assert any("seq 4..5" in text and "never signed" in text for text in findings(verdict, NOTE))
    assert findings(verdict, UNVOUCHED) == []


# --- the signing key ---------------------------------------------------------------------------------------


def test_the_signing_key_is_made_once_for_the_owner_only(tmp_path):
    path = tmp_path / "home" / "credentials" / "audit-signing.key"
    with pytest.raises(FileNotFoundError):
        load_signing_key(path, create=False)
    key = load_signing_key(path, create=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    again = load_signing_key(path, create=True)
    assert public_key_text(again) == public_key_text(key) == public_key_text(load_signing_key(path, create=False))
    text = public_key_text(key)
    assert text.startswith("ed25519:") and public_key_text(parse_public_key(text)) == text
    with pytest.raises(ValueError):
        parse_public_key("ed25519:" + base64.b64encode(b"short").decode())


# --- against a real nats-server -----------------------------------------------------------------------------


async def until(condition, timeout_s: float = 20.0):
    """Wait for an async condition, checking often, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (result := await condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    return result



async def test_checkpoints_are_signed_verify_and_resume_after_a_restart(bare_nats, tmp_path, caplog):
    broker, nc = bare_nats
    js = nc.jetstream()
    key = load_signing_key(tmp_path / "credentials" / "audit-signing.key", create=True)

    async def checkpointed_up_to(seq: int):
        messages = [m for _, m in await read_checkpoint_messages(js)]
        return messages if messages and read_signed(messages[-1]).checkpoint.to_seq >= seq else None

    async def run_signer_until(seq: int):
        stopping = asyncio.Event()
        signer = asyncio.create_task(keep_checkpointing(nc, key, 0.1, stopping))
        try:
            return await until(lambda: checkpointed_up_to(seq))
        finally:
            stopping.set()
            await asyncio.wait_for(signer, 10)

    for i in range(3):
        assert await append_record(js, a_record(f"job-{i}"))
    await run_signer_until(3)
    for i in range(3, 5):  # written while no signer runs
        assert await append_record(js, a_record(f"job-{i}"))
    messages = await run_signer_until(5)
    checkpoints = [read_signed(m).checkpoint for m in messages]
    assert (checkpoints[0].from_seq, checkpoints[0].new_segment) == (1, True)
    assert (checkpoints[-1].to_seq, checkpoints[-1].new_segment) == (5, False)
    assert all(b.from_seq == a.to_seq + 1 and b.chain_before == a.chain_after
               for a, b in zip(checkpoints, checkpoints[1:]))

    stream = await stream_facts(js)
    entries = [entry async for entry in read_entries(js)]
    verdict = verify_log(entries, messages, stream, pinned=public_key_text(key))
    assert (verdict.exit_code, verdict.vouched) == (0, 5), verdict.lines()
    assert verify_export(b"".join(export_lines(stream, entries, messages)), pinned=public_key_text(key)).exit_code == 0

    # Without its checkpoint stream it says so, one line per round, and keeps going.
    await js.delete_stream(CHECKPOINTS_STREAM)
    caplog.set_level(logging.WARNING, logger="conclave.checkpoints")
    stopping = asyncio.Event()
    signer = asyncio.create_task(keep_checkpointing(nc, key, 0.05, stopping))

    async def warned_twice():
        return len([r for r in caplog.records if "audit checkpoint not signed" in r.getMessage()]) >= 2

    await until(warned_twice)
    stopping.set()
    await asyncio.wait_for(signer, 10)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records)


async def test_appends_and_checkpoints_go_on_after_every_record_aged_out(bare_nats, tmp_path):
    from nats.js.api import StreamConfig

    broker, nc = bare_nats
    js = nc.jetstream()

    def retention(max_age_s: float) -> StreamConfig:
        return StreamConfig(name=AUDIT_STREAM, subjects=["conclave.audit.>"], max_age=max_age_s, deny_delete=True,
                            deny_purge=True)

    await js.delete_stream(AUDIT_STREAM)  # made again with a retention of a day, which a checkpoint signs
    await js.add_stream(retention(DAY))
    key = load_signing_key(tmp_path / "audit.key", create=True)
    assert await append_record(js, a_record("job-1")) and await append_record(js, a_record("job-2"))
    [first] = await sign_new_entries(js, key)

    # Age them out now, whatever the machine's speed: the operator shortens the retention until the stream is
    # empty, then puts it back, so that the configuration matches what was signed.
    await js.update_stream(retention(1.0))

    async def emptied():
        return (await js.stream_info(AUDIT_STREAM)).state.messages == 0

    await until(emptied)
    await js.update_stream(retention(DAY))
    # Version 0.4 chained onto the tail and found none: from here on every append failed.
    assert await append_record(js, a_record("job-3")) is True
    [second] = await sign_new_entries(js, key)
    # Seq 1..2 were signed before they aged out: the chain goes on from the value signed for them.
    assert (first.from_seq, first.to_seq, second.from_seq, second.new_segment) == (1, 2, 3, False)
    assert second.chain_before == first.chain_after and second.first_seq == 3
    entries = [entry async for entry in read_entries(js)]
    messages = [m for _, m in await read_checkpoint_messages(js)]
    verdict = verify_log(entries, messages, await stream_facts(js), pinned=public_key_text(key))
    # Appended before checkpoint 1, at a time nothing signed: nothing says they left before a day was up.
    assert (verdict.exit_code, verdict.vouched) == (0, 1), verdict.lines()
    assert any("seq 1..2" in text and "aged out" in text for text in findings(verdict, NOTE))


async def test_the_audit_command_lists_exports_and_verifies(bare_nats):
    import subprocess
    import sys

    broker, nc = bare_nats
    js = nc.jetstream()
    key = load_signing_key(broker.home / "credentials" / "audit-signing.key", create=True)
    job = full_job("job-1", "one\u2028two")
    await append_record(js, record_for("job-1", job, done("job-1"), submitter="billing", model="m", revision="r",
                                       worker="w"))
    await append_record(js, a_record("job-2"))
    await sign_new_entries(js, key)
    await append_record(js, a_record("job-3"))  # not signed yet

    def audit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(broker.home), "audit", *args,
                               "--nats-url", broker.url], capture_output=True, text=True, timeout=120)

    key_text = audit("key")
    assert key_text.returncode == 0 and key_text.stdout.strip() == public_key_text(key)
    listed = audit("list", "--submitter", "billing").stdout.splitlines()
    assert len(listed) == 1 and "\tbilling\tnats:billing\tnats\tdone" in listed[0]
    shown = audit("show", "job-1")
    assert msgspec.json.decode(shown.stdout, type=AuditRecord).claimed_caller == "key:alice:ab12"
    live = audit("verify")  # pins this home's key
    assert live.returncode == 3, live.stdout + live.stderr
    assert "first entry not vouched for: seq 3 (job job-3): appended after the last checkpoint" in live.stdout
    assert "last checkpoint: ends at seq 2" in live.stdout
    assert audit("verify", "--expect-seq", "3").returncode == 1  # seq 3 is not signed yet
    export = broker.home / "audit.jsonl"
    export.write_bytes(b"an older export")
    export.chmod(0o644)
    assert audit("export", "--output", str(export)).returncode == 0
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o600  # every prompt and answer: owner-only
    checked = audit("verify", "--file", str(export), "--public-key", public_key_text(key), "--expect-seq", "2")
    assert checked.returncode == 3 and "result: nothing found wrong, but 1 of 3 entries" in checked.stdout
    lines = export.read_bytes().split(b"\n")
    (broker.home / "cut.jsonl").write_bytes(b"\n".join(line for line in lines if b'"seq":2' not in line))
    cut = audit("verify", "--file", str(broker.home / "cut.jsonl"), "--public-key", public_key_text(key))
    assert cut.returncode == 1 and "BROKEN" in cut.stdout
