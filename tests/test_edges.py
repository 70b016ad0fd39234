"""Clear edges, tried as a new user would: one clear line instead of tracebacks and retries, nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import msgspec

from ops.config import free_port
from pipeline.subjects import JOBS_STREAM, job_subject
from schemas.jobs import Failed, Job
from schemas.openai import ChatMessage
from pipeline.access import OPERATOR
from tests.conftest import FRANCE, MODEL, SUBMITTER, start_bare_nats, wait_for_audit_record
from tests.test_durability import final_event


def conclave(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=timeout)


def one_clear_line(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and text in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_find_the_running_deployment_of_their_home(server, client):
    # The session's deployment runs on a random NATS port; `audit` finds it through --home alone.
    client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=2)
    listed = conclave("--home", str(server.home), "audit", "list", "--limit", "1")
    assert listed.returncode == 0 and MODEL in listed.stdout, listed.stderr


def test_commands_without_a_deployment_fail_in_one_line_within_seconds(tmp_path):
    started = time.monotonic()
    one_clear_line(conclave("--home", str(tmp_path), "audit", "list"), 2, "no running conclave serve found")
    unreachable = f"nats://127.0.0.1:{free_port()}"
    one_clear_line(conclave("audit", "verify", "--nats-url", unreachable), 1, f"cannot reach NATS at {unreachable}")
    assert time.monotonic() - started < 30


def test_audit_on_a_nats_server_without_an_audit_log_says_so(tmp_path):
    bare = start_bare_nats(tmp_path)  # no streams made
    try:
        one_clear_line(conclave("--home", str(tmp_path), "audit", "verify", "--nats-url", bare.url), 2,
                       "there is no audit log")
    finally:
        bare.stop()


def test_model_import_errors_are_one_line_and_ids_stay_in_the_store(tmp_path, server):
    home = tmp_path / "home"
    one_clear_line(conclave("--home", str(home), "models", "import", "/no/such/file.gguf"), 2,
                   "/no/such/file.gguf: no such file")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    one_clear_line(conclave("--home", str(home), "models", "import", str(not_gguf)), 2, "could not import it")
    for bad in ("..", ".", "a/../../b", "", "x y"):
        one_clear_line(conclave("--home", str(home), "models", "import", str(not_gguf), "--id", bad), 2,
                       "cannot be a model id")
    assert not (tmp_path / "b").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["home", "notes.gguf"]
    one_clear_line(conclave("--home", str(home), "serve", "--model", ".", "--port", "1", "--nats-port", "1"), 2,
                   "is not a model directory")


def test_serve_help_shows_the_defaults():
    text = conclave("serve", "--help").stdout
    for flag, default in [("--port", "8000"), ("--max-batch", "16"), ("--default-max-tokens", "2048"),
                          ("--max-queue-wait", "60.0"), ("--heartbeat", "2.0")]:
        entry = re.search(rf"\n  {flag} (.*?)\(default:\s+([^)]*)\)", text, re.S)
        assert entry and "\n  -" not in entry[1] and entry[2] == default, flag


async def test_a_job_for_a_model_nobody_serves_is_answered_404_and_recorded(server):
    nc = await server.connect()
    try:
        # A model nobody serves, and the served model under a token that is not its canonical one (`%53` is
        # "S"): no consumer's filter matches that subject either.
        odd_subject = f"conclave.jobs.%53{MODEL[1:]}.{SUBMITTER}"
        jobs = {"nope": (job_subject("nope", SUBMITTER), "nope"), "odd": (odd_subject, MODEL)}
        replies = {}
        for name, (subject, model) in jobs.items():
            replies[name] = await nc.subscribe(f"conclave.replies.tests.{name}")
            job = Job(id=f"job-{name}", model=model, reply_subject=f"conclave.replies.tests.{name}", kind="chat",
                      created=time.time(), messages=[ChatMessage(**m) for m in FRANCE])
            await nc.jetstream().publish(subject, msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        for name in jobs:
            failed = await final_event(replies[name])
            assert isinstance(failed, Failed) and (failed.status, failed.error.code) == (404, "model_not_found")
        record = await wait_for_audit_record(server, lambda r: r.job_id == "job-nope")
        assert (record.outcome, record.model, record.error.code) == ("failed", "nope", "model_not_found")
        operator = await server.connect(OPERATOR)
        for subject, _ in jobs.values():
            info = await operator.jetstream().stream_info(JOBS_STREAM, subjects_filter=subject)
            assert not info.state.subjects  # nothing left waiting for a worker that will never come
        await operator.close()
    finally:
        await nc.close()
