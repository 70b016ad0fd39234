"""Authenticated NATS with least privilege: who may connect, what each role is refused, and jobs whose
reply subject or caller is not theirs (pipeline/access.py, pipeline/intake.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import msgspec
import nats
import openai
import pytest
from nats.js.api import StreamConfig

from ops.config import free_port
from ops.credentials import role_identity
from pipeline.access import AUDITOR, INGRESS, OPERATOR, worker_role
from pipeline.connection import redacted
from pipeline.nats_server import EmbeddedNats
from pipeline.streams import ensure_streams
from pipeline.subjects import (AUDIT_STREAM, JOBS_STREAM, NODES_STREAM, RESULTS_STREAM, audit_subject, cancel_subject,
                               group_wake_subject, job_subject, reply_subject, result_subject, status_subject)
from schemas.jobs import Done, Event, Failed, Job, SamplingParams, WorkerStatus
from schemas.openai import ChatMessage
from tests.conftest import (FRANCE, MODEL, SUBMITTER, start_bare_nats, start_server, start_worker,
                            wait_for_audit_record)

decode_event = msgspec.json.Decoder(Event).decode
PERMISSION = "permissions violation"


class Watched:
    """A connection whose asynchronous server errors (permission violations) are kept."""

    def __init__(self):
        self.errors: list[str] = []
        self.nc = None

    async def open(self, srv, role: str) -> "Watched":
        async def keep(exc):
            self.errors.append(str(exc).lower())

        self.nc = await srv.connect(role, error_cb=keep, allow_reconnect=False)
        return self

    async def refused(self, action, subject: str) -> None:
        """Run `action`; the server must refuse it with a permissions violation naming `subject` (which nats-py
        reports to the error callback; a request also times out or fails)."""
        seen = len(self.errors)
        try:  # a refused request gets no answer: its refusal is the error below, no need to wait it out
            await asyncio.wait_for(action(), 0.5)
        except (nats.errors.Error, asyncio.TimeoutError):
            pass
        # The server answers in order (its -ERR comes before this PONG), but nats-py runs the error callback
        # as a task of its own: wait for it, up to a deadline.
        await self.nc.flush(timeout=5)
        deadline = time.monotonic() + 5
        expected = f'{PERMISSION} for {"subscription" if subject.startswith("sub ") else "publish"} to ' \
                   f'"{subject.removeprefix("sub ").lower()}"'
        while not any(expected in error for error in self.errors[seen:]):
            assert time.monotonic() < deadline, f"not refused ({expected}); errors: {self.errors[seen:]}"
            await asyncio.sleep(0.01)


async def as_role(srv, role: str) -> Watched:
    return await Watched().open(srv, role)


async def final_of(sub) -> Done | Failed:
    while not isinstance(event := decode_event((await sub.next_msg(timeout=180)).data), (Done, Failed)):
        pass
    return event


def job_for(job_id: str, reply: str, **fields) -> Job:
    return Job(id=job_id, model=MODEL, reply_subject=reply, kind="chat", stream=False, created=time.time(),
               messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=0, max_tokens=12),
               **fields)


async def test_an_anonymous_connection_is_refused(server):
    with pytest.raises(nats.errors.Error) as refused:
        await nats.connect(server.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    assert "authorization violation" in str(refused.value).lower()


async def test_each_role_is_refused_what_it_may_not_do(server):
    shorter = StreamConfig(name=AUDIT_STREAM, subjects=["conclave.audit.>"], max_age=2)
    worker = await as_role(server, worker_role(MODEL))
    submitter = await as_role(server, SUBMITTER)
    ingress = await as_role(server, INGRESS)
    try:
        for role in (worker, submitter, ingress):
            js = role.nc.jetstream()
            await role.refused(lambda: js.update_stream(shorter), f"$JS.API.STREAM.UPDATE.{AUDIT_STREAM}")
            await role.refused(lambda: js.delete_stream(AUDIT_STREAM), f"$JS.API.STREAM.DELETE.{AUDIT_STREAM}")
            await role.refused(lambda: js.delete_stream(JOBS_STREAM), f"$JS.API.STREAM.DELETE.{JOBS_STREAM}")
            # Only the operator reads the audit log, and nobody else sees others' prompts.
            await role.refused(lambda: js.get_msg(AUDIT_STREAM, 1), f"$JS.API.STREAM.MSG.GET.{AUDIT_STREAM}")
            await role.refused(lambda: js.stream_info(AUDIT_STREAM), f"$JS.API.STREAM.INFO.{AUDIT_STREAM}")
            await role.refused(lambda: role.nc.subscribe(job_subject(MODEL, "*")), f"sub {job_subject(MODEL, '*')}")
        js = worker.nc.jetstream()
        # A worker writes its model's results and records only, and reads no other model's jobs.
        for subject in (audit_subject("other", SUBMITTER, "x"), result_subject("other", SUBMITTER, "x")):
            await worker.refused(lambda: js.publish(subject, b"{}"), subject)
        await worker.refused(lambda: js.consumer_info(JOBS_STREAM, "workers-other"),
                             f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.workers-other")
        await worker.refused(lambda: js.add_consumer(JOBS_STREAM, durable_name="mine", filter_subject="conclave.jobs.>"),
                             f"$JS.API.CONSUMER.DURABLE.CREATE.{JOBS_STREAM}.mine")
        await worker.refused(lambda: worker.nc.publish(group_wake_subject("other", "g"), b""),
                             group_wake_subject("other", "g"))
        # A submitter publishes jobs and cancels in its own name only and hears only its own replies.
        js, nc = submitter.nc.jetstream(), submitter.nc
        await submitter.refused(lambda: js.publish(job_subject(MODEL, INGRESS), b"{}"), job_subject(MODEL, INGRESS))
        await submitter.refused(lambda: nc.publish(cancel_subject(INGRESS, "x"), b"{}"), cancel_subject(INGRESS, "x"))
        for pattern in ("_INBOX.>", "conclave.replies.>", f"conclave.replies.{INGRESS}.>"):
            await submitter.refused(lambda: nc.subscribe(pattern), f"sub {pattern}")
        for subject in (audit_subject(MODEL, SUBMITTER, "forged"), reply_subject(INGRESS, "victim")):
            await submitter.refused(lambda: nc.publish(subject, b"{}"), subject)
        await submitter.refused(lambda: js.stream_info(NODES_STREAM), f"$JS.API.STREAM.INFO.{NODES_STREAM}")
        theirs = result_subject(MODEL, INGRESS, "x")
        await submitter.refused(lambda: js.get_last_msg(RESULTS_STREAM, theirs, direct=True),
                                f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.{theirs}")
        # The ingress submits in its own name too.
        await ingress.refused(lambda: ingress.nc.jetstream().publish(job_subject(MODEL, SUBMITTER), b"{}"),
                              job_subject(MODEL, SUBMITTER))
    finally:
        for role in (worker, submitter, ingress):
            await role.nc.close()
    # The dashboard's auditor reads the audit log and changes nothing, nor submits or hears anyone's answers.
    auditor = await as_role(server, AUDITOR)
    try:
        js = auditor.nc.jetstream()
        assert (await js.stream_info(AUDIT_STREAM)).state.messages >= 0
        await auditor.refused(lambda: js.update_stream(shorter), f"$JS.API.STREAM.UPDATE.{AUDIT_STREAM}")
        await auditor.refused(lambda: js.delete_msg(AUDIT_STREAM, 1), f"$JS.API.STREAM.MSG.DELETE.{AUDIT_STREAM}")
        await auditor.refused(lambda: js.publish(job_subject(MODEL, AUDITOR), b"{}"), job_subject(MODEL, AUDITOR))
        forged = audit_subject(MODEL, SUBMITTER, "forged")
        await auditor.refused(lambda: auditor.nc.publish(forged, b"{}"), forged)
        await auditor.refused(lambda: auditor.nc.subscribe("conclave.replies.>"), "sub conclave.replies.>")
    finally:
        await auditor.nc.close()
    # The operator may: the same read works for it.
    operator = await server.connect(OPERATOR)
    try:
        assert (await operator.jetstream().stream_info(AUDIT_STREAM)).config.deny_delete
    finally:
        await operator.close()


async def test_a_later_start_never_shortens_the_audit_retention(server, monkeypatch):
    operator = await server.connect(OPERATOR)
    try:
        before = (await operator.jetstream().stream_info(AUDIT_STREAM)).config.max_age
        monkeypatch.setenv("CONCLAVE_AUDIT_RETENTION_DAYS", "0.00001")
        await ensure_streams(operator.jetstream())
        assert (await operator.jetstream().stream_info(AUDIT_STREAM)).config.max_age == before
    finally:
        await operator.close()


async def stored_result_of(nc, job_id: str) -> Done | Failed:
    return decode_event((await nc.jetstream().get_last_msg(
        RESULTS_STREAM, result_subject(MODEL, SUBMITTER, job_id), direct=True)).data)


async def test_a_reply_subject_outside_the_submitters_prefix_is_a_schema_error_and_settled(server):
    victim = reply_subject(INGRESS, "chatcmpl-victim")
    operator = await server.connect(OPERATOR)
    submitter = await server.connect()
    try:
        overheard = await operator.subscribe(victim)
        js = submitter.jetstream()
        for job_id, reply in [("job-inject", victim), ("job-poison", audit_subject(MODEL, INGRESS, "x")),
                              ("job-wild", "conclave.replies.tests.*"), ("job-space", "conclave.replies.tests.a b")]:
            await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job_for(job_id, reply)),
                             headers={"Nats-Msg-Id": job_id})
            record = await wait_for_audit_record(server, lambda r, i=job_id: r.job_id == i)
            assert (record.outcome, record.error.code, record.submitter) == ("failed", "invalid_job", SUBMITTER)
            assert "reply_subject" in record.error.message
            # Settled, not left to be redelivered: its submitter can read the error by its job id.
            result = await stored_result_of(submitter, job_id)
            assert isinstance(result, Failed) and result.status == 400
        # Every job above was settled: its record, its final event (if any), then its ack, in that order on the
        # worker's one connection. Once all are acked, an injected answer would already have reached us.
        subject = job_subject(MODEL, SUBMITTER)
        deadline = time.monotonic() + 60
        while (await operator.jetstream().stream_info(JOBS_STREAM, subjects_filter=subject)).state.subjects:
            assert time.monotonic() < deadline, "the refused jobs were never acked"
            await asyncio.sleep(0.05)
        await operator.flush(timeout=5)
        assert overheard.pending_msgs == 0
        # The audit log goes on: a proper job is answered and recorded after all of them.
        good = job_for("job-after-poison", reply_subject(SUBMITTER, "after"))
        replies = await submitter.subscribe(good.reply_subject)
        await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(good), headers={"Nats-Msg-Id": good.id})
        done = await final_of(replies)
        assert isinstance(done, Done) and "Paris" in done.text
        await wait_for_audit_record(server, lambda r: r.job_id == good.id)
    finally:
        await submitter.close()
        await operator.close()


async def test_the_record_names_the_authenticated_submitter_and_keeps_a_claimed_caller_as_a_claim(server, client):
    submitter = await server.connect()
    try:
        forged = job_for("job-claims", reply_subject(SUBMITTER, "claims"), caller="key:alice:0123456789ab",
                         source="http")
        await submitter.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(forged),
                                            headers={"Nats-Msg-Id": forged.id})
        record = await wait_for_audit_record(server, lambda r: r.job_id == forged.id)
        assert (record.submitter, record.caller, record.source) == (SUBMITTER, f"nats:{SUBMITTER}", "nats")
        assert (record.claimed_caller, record.claimed_source) == ("key:alice:0123456789ab", "http")
    finally:
        await submitter.close()
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=2)
    record = await wait_for_audit_record(server, lambda r: r.job_id == reply.id)
    assert (record.submitter, record.caller, record.source, record.claimed_caller) == (INGRESS, "anonymous", "http",
                                                                                      None)


def conclave(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=60)


async def connects(srv, identity_options: dict, deadline_s: float = 30.0) -> bool:
    """Whether a connection with these options is accepted once the server has reloaded (a SIGHUP is
    asynchronous: try until the deadline for the expected answer)."""
    try:
        nc = await nats.connect(srv.nats_url, allow_reconnect=False, max_reconnect_attempts=0, **identity_options)
    except nats.errors.Error:
        return False
    await nc.close()
    return True


async def test_a_submitter_issued_and_revoked_while_serving(server, tmp_path):
    seed = tmp_path / "billing.nk"
    issued = conclave(server.home, "credentials", "issue", "billing", "--out", str(seed))
    assert issued.returncode == 0, issued.stderr
    assert "conclave.jobs.<model>.billing" in issued.stdout and oct(seed.stat().st_mode & 0o777) == "0o600"
    options = {"nkeys_seed": str(seed), "inbox_prefix": "conclave.replies.billing._INBOX"}
    deadline = time.monotonic() + 30
    while not await connects(server, options):
        assert time.monotonic() < deadline, "the issued submitter was never accepted"
        await asyncio.sleep(0.2)
    nc = await nats.connect(server.nats_url, **options)
    try:
        job = job_for("job-billing", reply_subject("billing", "one"))
        replies = await nc.subscribe(job.reply_subject)
        await nc.jetstream().publish(job_subject(MODEL, "billing"), msgspec.json.encode(job),
                                     headers={"Nats-Msg-Id": job.id})
        done = await final_of(replies)
        assert isinstance(done, Done) and "Paris" in done.text
    finally:
        await nc.close()
    assert conclave(server.home, "credentials", "revoke", "billing").returncode == 0
    deadline = time.monotonic() + 30
    while await connects(server, options):
        assert time.monotonic() < deadline, "the revoked submitter is still accepted"
        await asyncio.sleep(0.2)
    assert conclave(server.home, "credentials", "issue", "ingress").returncode == 2  # a role's name is reserved


def test_the_server_configuration_for_an_existing_nats_is_the_embedded_one(server):
    printed = conclave(server.home, "credentials", "server-config")
    assert printed.returncode == 0
    assert printed.stdout == (server.home / "nats" / "authorization.conf").read_text()
    assert role_identity(server.home, OPERATOR).seed_file.stat().st_mode & 0o077 == 0
    assert (server.home / "credentials").stat().st_mode & 0o077 == 0


def test_a_nats_url_with_a_password_is_never_shown():
    assert redacted("nats://app:s3cret@10.0.0.1:4222") == "nats://***@10.0.0.1:4222"
    assert redacted("nats://10.0.0.1:4222") == "nats://10.0.0.1:4222"


async def test_a_worker_that_cannot_append_its_record_acks_nothing_and_says_so(bare_nats, server):
    broker, operator = bare_nats
    js = operator.jetstream()
    statuses = await operator.subscribe(status_subject(MODEL))
    worker = start_worker(server, broker)
    try:
        await js.delete_stream(AUDIT_STREAM)  # every append now fails (NATS answers no one)
        job = job_for("job-unrecorded", reply_subject(SUBMITTER, "unrecorded"))
        replies = await operator.subscribe(job.reply_subject)
        await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        while "audit log" not in (status := msgspec.json.decode((await statuses.next_msg(timeout=120)).data,
                                                                 type=WorkerStatus)).problem:
            pass
        # No record, no ack, no answer: the job is still queued and its requester has heard no outcome.
        assert (await js.stream_info(JOBS_STREAM)).state.messages == 1
        await operator.flush(timeout=5)
        while replies.pending_msgs:  # accepted and heartbeats only
            assert not isinstance(decode_event((await replies.next_msg(timeout=5)).data), (Done, Failed))
        await ensure_streams(js)  # the operator restores the log: the redelivery settles from the stored result
        record = await wait_for_audit_record(broker, lambda r: r.job_id == job.id)
        assert record.outcome == "done"
        event = await final_of(replies)
        assert isinstance(event, Done) and event.text == record.output
        assert worker.process.poll() is None and "Traceback" not in worker.log
        assert status.problem.startswith("audit log")
    finally:
        assert worker.stop() == 0


def test_a_deployment_on_an_existing_nats_server_with_the_documented_configuration(server, tmp_path):
    home, model = tmp_path / "home", str(server.home / "models" / MODEL)
    printed = conclave(home, "credentials", "server-config", "--model", MODEL)
    assert printed.returncode == 0 and printed.stdout.startswith("authorization {")
    # The operator's own server, configured with the printed block (here: a nats-server whose configuration
    # includes it; pipeline/nats_server.py writes the rest).
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "authorization.conf").write_text(printed.stdout)
    theirs = EmbeddedNats(tmp_path / "theirs", port=free_port())
    theirs.start()
    try:
        srv = start_server(home, "--model", model, "--nats-url", theirs.url)
        try:
            reply = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300).completions.create(
                model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=3)
            assert "Paris" in reply.choices[0].text
        finally:
            assert srv.stop() == 0
        # A server that does not know this home's keys: one clear line, not a retry loop.
        other = start_bare_nats(tmp_path / "other")
        try:
            with pytest.raises(RuntimeError) as refused:
                start_server(tmp_path / "third", "--model", model, "--nats-url", other.url)
            assert "credentials server-config" in str(refused.value)
        finally:
            other.stop()
    finally:
        theirs.stop()
