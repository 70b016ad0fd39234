"""Pure functions: stop matching, error translation, subject names, model splits, group files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
import pytest

from ingress.errors import validation_error
from pipeline.subjects import is_canonical_token, job_subject, name_of_token, parse_job_subject, subject_token
from schemas.openai import ChatCompletionRequest
from workers.stops import StopMatcher


def run(stops, pieces):
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(
    "stops, pieces, expected",
    [
        (["END"], ["abc", "E", "N", "D", "x"], ("abc", True)),  # split across pieces
        (["END"], ["abcEN", "Dx"], ("abc", True)),
        (["END"], ["abcEN", "x"], ("abcENx", False)),  # a false start is released
        (["END"], ["abcE"], ("abcE", False)),  # held text is flushed at the end
        (["\n\n", "."], ["Hi", " there. More"], ("Hi there", True)),  # the earliest stop wins
        ([], ["a", "b"], ("ab", False)),
    ],
)
def test_stop_matcher(stops, pieces, expected):
    assert run(stops, pieces) == expected


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopMatcher(["Paris"])
    assert matcher.feed("The capital is P") == ("The capital is ", False)
    assert matcher.feed("ar") == ("", False)
    assert matcher.feed("k") == ("Park", False)


def param_of(body: bytes) -> tuple:
    with pytest.raises(msgspec.MsgspecError) as caught:
        msgspec.json.decode(body, type=ChatCompletionRequest)
    error = validation_error(caught.value)
    return error.status, error.detail.param, error.detail.code


def test_validation_errors_name_the_param():
    assert param_of(b'{"model": 1, "messages": []}') == (400, "model", "invalid_type")
    assert param_of(b'{"model": "m", "messages": [{"role": "user", "content": 5}]}') == (
        400, "messages[0].content", "invalid_type")
    assert param_of(b'[]') == (400, None, "invalid_type")
    assert param_of(b'{"model"') == (400, None, None)


def test_subject_names_are_single_tokens_one_to_one():
    assert subject_token("org/Model-1.5B v2") == "org%2FModel-1%2E5B%20v2"
    assert subject_token("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    # Two models (or job ids) never share a subject or a consumer: a lossy mapping made `a.b` and `a_b` one.
    assert job_subject("a.b", "s") == "conclave.jobs.a%2Eb.s" != job_subject("a_b", "s") == "conclave.jobs.a_b.s"
    assert subject_token("a%2Eb") == "a%252Eb" != subject_token("a.b")
    assert subject_token("é") == "%C3%A9"
    # and back: who sent a job is read from its subject, the model by inverting the token
    for name in ("org/Model-1.5B v2", "a%2Eb", "é"):
        assert name_of_token(subject_token(name)) == name
        assert parse_job_subject(job_subject(name, "billing")) == (subject_token(name), "billing")
    assert parse_job_subject("conclave.jobs.m") is None  # the form before submitters were authenticated
    assert is_canonical_token(subject_token("Qwen2.5 7B")) and not is_canonical_token("%41bc")


def test_a_reply_subject_must_lie_under_its_submitters_own_prefix():
    from pipeline.intake import open_delivery
    from pipeline.limits import PayloadLimits

    def reply_of(reply: str, subject: str = "conclave.jobs.m.tests"):
        job = b'{"id":"j","model":"m","kind":"completion","prompt":"x","reply_subject":"%s"}' % reply.encode()
        delivery, error, status = open_delivery(subject, job, 1, PayloadLimits(2**20))
        return delivery, (status, error.code if error else None)

    delivery, outcome = reply_of("conclave.replies.tests.mine")
    assert (delivery.submitter, delivery.model, delivery.reply_subject, outcome) == (
        "tests", "m", "conclave.replies.tests.mine", (0, None))
    for forged in ("conclave.replies.ingress.chatcmpl-1", "conclave.audit.m.ingress.x", "conclave.replies.tests.*",
                   "conclave.replies.tests", "conclave.replies.testsX.a", "_INBOX.abc"):
        delivery, outcome = reply_of(forged)
        assert outcome == (400, "invalid_job") and delivery.reply_subject is None, forged
    delivery, outcome = reply_of("conclave.replies.tests.a", subject="conclave.jobs.m")
    assert delivery.submitter == "unauthenticated" and delivery.reply_subject is None


SMOLLM = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "intermediate_size": 1536,
          "quantization": {"group_size": 64, "bits": 8}}


def test_tensor_parallel_sizes_follow_heads_and_quantization_groups():
    from workers.split import ShardError, check_tensor_parallel, tensor_parallel_sizes

    assert tensor_parallel_sizes(SMOLLM, limit=9) == [1, 3]
    llama8b = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336}
    assert tensor_parallel_sizes(llama8b, limit=16) == [1, 2, 4, 8]
    with pytest.raises(ShardError, match="split evenly over 1, 3 ranks"):
        check_tensor_parallel(SMOLLM, 2)


def test_pipeline_split_even_proportional_and_checked():
    from workers.split import ShardError, check_pipeline_split, pipeline_split

    assert pipeline_split(30, 2) == [15, 15]
    assert pipeline_split(31, 2) == [16, 15]
    assert pipeline_split(30, 3, [256, 128, 64]) == [17, 9, 4]
    assert pipeline_split(4, 4, [100, 1, 1, 1]) == [1, 1, 1, 1]  # every rank keeps at least one layer
    with pytest.raises(ShardError):
        pipeline_split(2, 3)
    with pytest.raises(ShardError, match="add up to the model's 30 layers"):
        check_pipeline_split([10, 10], 30, 2)


def test_group_file_and_rank_environments(tmp_path):
    import json

    from ops.group import GroupSpecError, load_group_file, rank_launches

    path = tmp_path / "cluster.toml"
    path.write_text('layout = "pipeline"\nbackend = "jaccl"\nport = 40000\n'
                    '[[hosts]]\nssh = "a"\nip = "10.0.0.1"\nmemory_gb = 256\nrdma = ["", "rdma_en3"]\n'
                    '[[hosts]]\nssh = "b"\nip = "10.0.0.2"\nmemory_gb = 128\nrdma = ["rdma_en5", ""]\n')
    spec = load_group_file(path)
    assert spec.size == 2 and spec.memory_weights() == [256, 128]
    first, second = rank_launches(spec)
    assert second.env == {"MLX_JACCL_COORDINATOR": "10.0.0.1:40000", "MLX_RANK": "1"}
    assert json.loads(second.files["MLX_IBV_DEVICES"]) == [[None, "rdma_en3"], ["rdma_en5", None]]

    path.write_text('layout = "tensor"\n[[hosts]]\nssh = "a"\nip = "10.0.0.1"\n[[hosts]]\nssh = "b"\nip = "10.0.0.2"\n')
    launches = rank_launches(load_group_file(path))
    assert json.loads(launches[0].files["MLX_HOSTFILE"]) == [["10.0.0.1:32323"], ["10.0.0.2:32324"]]
    assert [launch.env["MLX_RANK"] for launch in launches] == ["0", "1"]

    path.write_text('layout = "pipeline"\nbackend = "jaccl"\n[[hosts]]\nssh = "a"\n[[hosts]]\nssh = "b"\n')
    with pytest.raises(GroupSpecError, match="rdma must name the device towards every other rank"):
        load_group_file(path)
    path.write_text('layout = "diagonal"\n')
    with pytest.raises(GroupSpecError, match="layout must be"):
        load_group_file(path)


def test_one_rank_group_file_is_one_process(tmp_path):
    from ops.group import load_group_file, rank_launches

    path = tmp_path / "one.toml"
    path.write_text('layout = "tensor"\n[[hosts]]\nssh = "localhost"\n')
    spec = load_group_file(path)
    assert (spec.layout, spec.size) == ("whole", 1) and rank_launches(spec)[0].env == {}


def test_committed_json_schemas_match_the_message_types():
    # Non-Python submitters read schemas/json/; regenerate with `conclave schemas` after changing a type.
    from pathlib import Path

    from ops.schemas import schema_texts

    folder = Path(__file__).resolve().parent.parent / "schemas" / "json"
    assert {name: (folder / name).read_text() for name in schema_texts()} == schema_texts()


def test_commands_serve_and_nodes_start_without_importing_mlx_lm(tmp_path):
    """mlx-lm (with transformers) takes seconds to import: every `conclave` command, serve without a group (which
    plans its one rank), a node's agent and the supervisor would wait for it before doing anything. Only ranks and
    model checks need it. Nor does finding the bundled model import its package, which loads llama.cpp."""
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    probe = ("import sys, ops.cli, ops.serve, ops.node, ops.controller, ops.agent, ops.supervise\n"
             "from ops.group import local_group, plan_group\n"
             "from workers.store import bundled_gguf\n"
             f"plan_group(local_group('pipeline', 1), __import__('pathlib').Path({str(tmp_path)!r}))\n"
             "assert bundled_gguf().is_file()\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx_lm', 'transformers', 'llama_cpp')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_service_ends_with_its_output_and_exit_code_whichever_way_it_ends():
    """`conclave serve` and `join` end with os._exit (ops/cli.py: run_service): what they printed or logged is still
    written (a pipe's buffer would otherwise be lost), and an error gives its message and the code `main` gives it."""
    cases = {"return": 0, "raise DeploymentError('a part of this node stopped')": 2, "raise RuntimeError('a bug')": 1,
             "raise SystemExit('stopping: no NATS')": 1, "raise SystemExit(3)": 3, "raise SystemExit": 0,
             "raise KeyboardInterrupt": 130}
    for ending, code in cases.items():
        probe = ("import asyncio, atexit, logging, sys\n"
                 "from ops.cli import run_service\n"
                 "atexit.register(print, 'the interpreter tore down')\n"  # it must not: os._exit skips it
                 "from ops.deployment import DeploymentError\n"
                 "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
                 "async def service():\n"
                 "    print('printed, not flushed')\n"
                 "    logging.getLogger('probe').info('logged')\n"
                 f"    {ending}\n"
                 "run_service(service())\n")
        buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a service's output is
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=buffered)
        assert done.returncode == code, (ending, done.stdout, done.stderr)
        assert done.stdout == "printed, not flushed\n" and "logged" in done.stderr, (ending, done.stdout, done.stderr)
        said = {2: "conclave: error: a part of this node stopped", 1: "a bug" if "bug" in ending else "no NATS"}
        assert said.get(code, "") in done.stderr


async def test_a_job_whose_accepted_event_was_lost_is_answered_by_what_came_next():
    """While an ingress reconnects to NATS, a job's events published meanwhile are lost (a reply subject keeps
    nothing): its `Accepted` may never arrive, and the first event heard is a chunk or the result itself. That event
    answers the request (ingress/respond.py); the non-streamed path once waited for `Accepted` past it and answered
    502 "The worker ended the job without a result." (CI, a nats-server killed under a queued job)."""
    from ingress.respond import final_result, first_answer, replayed
    from schemas.jobs import Chunk, Done, Usage

    done = Done(id="j", text="Paris", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=1,
                total_tokens=4), ttft_ms=1.0, duration_ms=2.0, worker="w")
    chunk = Chunk(id="j", index=0, text="Par", tokens=1)

    async def events(*sent):
        for event in sent:
            yield event

    assert await final_result(events(done)) == done  # not streamed
    for sent in ((done,), (chunk, done)):  # streamed: the first event heard is not dropped
        stream = events(*sent)
        first = await first_answer(stream)
        assert first == sent[0]
        assert [e async for e in replayed(first, stream)] == list(sent)


def test_a_ranks_counters_are_never_read_half_written(tmp_path):
    """The agent reads a rank's liveness file whenever it reports; a file rewritten in place was now and then read
    empty, and the node reported its rank without counters (CI)."""
    import threading

    from schemas.cluster import RankCounters
    from workers.status import alive_file, read_counters, write_counters

    path = alive_file(tmp_path, 0)
    write_counters(path, RankCounters(pid=1, active=1, peak=1, tokens=0))
    done, misses, reads = threading.Event(), [], []

    def read_all_the_time():
        while not done.is_set():
            reads.append(1)
            if read_counters(path) is None:
                misses.append(1)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for tokens in range(3000):
            write_counters(path, RankCounters(pid=1, active=1 << 30, peak=1 << 30, tokens=tokens))
    finally:
        done.set()
        reader.join()
    assert misses == [] and len(reads) > 100  # (the reader did race the writer)
    assert read_counters(path).tokens == 2999
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


def test_the_deployment_file_is_owner_only_and_replaced_whole(tmp_path):
    """serve.json carries the NATS URL (a password, where one is set): only its owner reads it, however often it is
    written, and no temporary file stays beside it."""
    import stat

    from ops.deployment import RUN_FILE, Deployment, record_deployment

    path = tmp_path / RUN_FILE
    path.write_text("{}")
    path.chmod(0o644)  # (one left by something else: replaced, not reused)
    for port in (4222, 4333):
        record_deployment(tmp_path, Deployment(pid=os.getpid(), http_url="http://127.0.0.1:8000",
                                               nats_url=f"nats://u:secret@127.0.0.1:{port}"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert msgspec.json.decode(path.read_bytes())["nats_url"].endswith(":4333")
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]
