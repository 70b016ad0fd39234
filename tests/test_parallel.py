"""Worker groups: real rank processes, real MLX collectives over loopback (ring backend), no mocks."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest

from ops.group import generate_on_group, local_group
from tests.conftest import FRANCE, MODEL, start_server, stream_until_broken
from tests.test_structured import CITY
from tests.tiny import tiny_llama
from tests.test_batching import PROMPTS, complete
from tests.test_tools import QUESTION, TOOLS
from tests.test_isolation import innocent_and_bad

@pytest.fixture(scope="module")
def tiny_model(server, tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), server.home / "models" / MODEL)


def generate(model_dir: Path, layout: str, ranks: int, split=None) -> dict:
    return generate_on_group(local_group(layout, ranks, split), model_dir, "Once upon a time", 64, raw=True)


def test_tensor_and_pipeline_groups_generate_the_single_process_tokens(tiny_model):
    single = generate(tiny_model, "whole", 1)
    assert len(single["tokens"]) == 64
    assert generate(tiny_model, "tensor", 2)["tokens"] == single["tokens"]
    even = generate(tiny_model, "pipeline", 2)
    assert even["tokens"] == single["tokens"]
    uneven = generate(tiny_model, "pipeline", 2, split=[1, 3])
    assert uneven["tokens"] == single["tokens"]
    assert [r["layers"] for r in uneven["per_rank"]] == [[0, 1], [1, 4]]

    # Each pipeline rank holds exactly its layers; the tied embedding sits on the first stage (input)
    # and the last (output head), the final norm on the last only.
    weights = mx.load(str(tiny_model / "model.safetensors"))

    def nbytes(prefixes):
        return sum(v.nbytes for k, v in weights.items() if k.startswith(prefixes))

    layers = lambda a, b: tuple(f"model.layers.{i}." for i in range(a, b))  # noqa: E731
    first, last = uneven["per_rank"]
    assert first["parameter_bytes"] == nbytes(layers(0, 1) + ("model.embed_tokens.",))
    assert last["parameter_bytes"] == nbytes(layers(1, 4) + ("model.embed_tokens.", "model.norm."))
    assert sum(r["parameter_bytes"] for r in even["per_rank"]) < 2 * nbytes(("model.",))


def test_tensor_parallel_that_does_not_divide_is_refused(server, tmp_path):
    # 9 heads and 3 key/value heads: 2 ranks cannot split them; the message names what works.
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "--home", str(tmp_path), "serve", "--tensor-parallel", "2",
         "--model", str(server.home / "models" / MODEL), "--port", "1", "--nats-port", "1"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "9 attention heads, 3 key/value heads" in result.stderr
    assert "split evenly over 1, 3 ranks" in result.stderr


def test_tensor_parallel_3_serves_the_bundled_model(server, tmp_path):
    srv = start_server(tmp_path / "home", "--model", str(server.home / "models" / MODEL), "--tensor-parallel", "3")
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
        assert "Paris" in reply.choices[0].message.content
        assert srv.health()["models"][MODEL]["live_workers"][0]["ranks"] == 3
    finally:
        assert srv.stop() == 0


def rank_pids(output: list[str]) -> dict[int, int]:
    """Rank -> pid of the latest group, from the ranks' log lines (`worker[rank R pid P]`)."""
    pids = {}
    for line in output:
        if match := re.search(r"worker\[rank (\d+) pid (\d+)\]", line):
            pids[int(match[1])] = int(match[2])
    return pids


def test_pipeline_parallel_serves_and_survives_a_killed_rank(server, client, tmp_path):
    server_client = client
    # A prefix cache of about one entry (1 MiB): finished requests evict others, which the leader announces to
    # the other rank in its plan; the group must stay in step through reuses and evictions.
    srv = start_server(tmp_path / "home", "--model", str(server.home / "models" / MODEL),
                       "--pipeline-parallel", "2", "--step-timeout", "10", "--prefix-cache-gb", "0.001")
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
        assert "Paris" in reply.choices[0].message.content
        assert srv.health()["models"][MODEL]["live_workers"][0]["layout"] == "pipeline"
        # Log probabilities come from the leader's sampler: the group's are the single process's.
        asked = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
        grouped = client.chat.completions.create(**asked).choices[0].logprobs.content
        alone = server_client.chat.completions.create(**asked).choices[0].logprobs.content
        assert [e.token for e in grouped] == [e.token for e in alone] and len(alone) > 1
        assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-2) for a, b in zip(grouped, alone))
        # So does the grammar of a JSON Schema: the group's answer is the single process's.
        asked = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=40, response_format={
            "type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
        grouped = client.chat.completions.create(**asked).choices[0].message.content
        assert grouped == server_client.chat.completions.create(**asked).choices[0].message.content
        assert json.loads(grouped)["city"]
        # And a forced tool call, and several answers (`n`) drawn from a seed: the single process's.
        asked = dict(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60)
        grouped = client.chat.completions.create(**asked).choices[0].message.tool_calls
        alone = server_client.chat.completions.create(**asked).choices[0].message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in grouped] == [
            (c.function.name, c.function.arguments) for c in alone]
        asked = dict(model=MODEL, messages=FRANCE, temperature=1.0, seed=11, max_tokens=8, n=2)
        assert [c.message.content for c in client.chat.completions.create(**asked).choices] == [
            c.message.content for c in server_client.chat.completions.create(**asked).choices]
        # A batch on the group: rows join and leave at different steps (different budgets, one stop rule),
        # every rank follows the leader's plan, and each text is the single process's text for it.
        batch = PROMPTS[:4]
        single = [complete(server_client, *p) for p in batch]
        with ThreadPoolExecutor(len(batch)) as pool:
            assert list(pool.map(lambda p: complete(client, *p), batch)) == single
        # A job the leader refuses is not run by the followers either; the group keeps serving.
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=10**6)
        assert refused.value.code == "context_length_exceeded"
        # A request whose top_k no sampler can take is refused before it joins: the stream beside it goes on
        # with its own text, and the group does not restart.
        alone, beside, error = innocent_and_bad(client, httpx.Client(base_url=srv.base_url, timeout=300),
                                                {"top_k": 50000, "temperature": 1.0})
        assert beside.startswith(alone) and error["param"] == "top_k"
        assert "restarting it" not in "".join(srv.output)

        # A dead rank: the supervisor sees it exit and restarts the whole group.
        follower = rank_pids(srv.output)[1]
        assert "lost a rank" in stream_until_broken(client, lambda: os.kill(follower, signal.SIGKILL))[0]
        reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
        assert "Paris" in reply.choices[0].message.content
        assert f"worker rank 1 (pid {follower} on localhost) exited with signal SIGKILL" in "".join(srv.output)

        # A stop string ends the request on every rank; the group keeps serving.
        reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12,
                                               stop=[" of"])
        assert reply.choices[0].message.content == "The capital" and reply.choices[0].finish_reason == "stop"

        # A hung rank (stopped, still alive): the leader's step timeout fails the request and the group restarts.
        follower = rank_pids(srv.output)[1]
        assert "lost a rank" in stream_until_broken(client, lambda: os.kill(follower, signal.SIGSTOP))[0]
        reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
        assert "Paris" in reply.choices[0].message.content
        log = "".join(srv.output)
        assert "no step for" in log and rank_pids(srv.output)[1] != follower
        # Each restart removed the folder of the group it replaced.
        assert len(list((srv.home / "groups").iterdir())) == 1
    finally:
        assert srv.stop() == 0


class Greedy:
    """One greedy request for BatchEngine (a `Row`): its tokens, up to `n`."""

    greedy = True
    share_prefill = False
    cancelled = threading.Event()  # never set

    def __init__(self, prompt: list[int], n: int):
        self.prompt, self.n, self.tokens, self.cached_tokens = prompt, n, [], 0

    def on_token(self, token: int) -> bool:
        self.tokens.append(token)
        return len(self.tokens) == self.n

    def choose(self, logits):  # when it shares a batch with a row sampled on its own
        return mx.argmax(logits, axis=-1)

    def fail(self, exc: Exception) -> None:
        raise AssertionError(f"a well-behaved row failed: {exc!r}")

    def on_leave(self, reason: str) -> None:
        pass


def run_rows(engine, rows: list) -> None:
    from workers.lockstep import admit_from

    engine.run(admit_from(list(rows)))


def test_batch_engine_prefix_cache_reuses_and_stays_within_its_bytes(tiny_model):
    from workers.lockstep import BatchEngine
    from workers.shard import load_shard

    shard = load_shard(tiny_model)
    base = list(range(100, 140))
    turns = [base, base + [7, 8, 9], base + [7, 8, 9, 10, 11]]
    alone = []
    for prompt in turns:  # no prefix cache: a fresh prefill each time
        row = Greedy(prompt, 12)
        run_rows(BatchEngine(shard, prefix_cache_bytes=0), [row])
        alone.append(row.tokens)
    # KV bytes of one token: 4 layers, keys and values, 4 KV heads of 16 floats.
    per_token = 4 * 2 * 4 * 16 * 4
    engine = BatchEngine(shard, prefix_cache_bytes=per_token * 60)  # room for one conversation, not two
    for prompt, expected in zip(turns, alone):
        row = Greedy(prompt, 12)
        run_rows(engine, [row])
        assert row.tokens == expected
    assert row.cached_tokens == len(turns[1])  # the last turn started from all of the previous one's prompt
    assert len(engine.prefixes) == 1 and engine.prefixes.nbytes <= per_token * 60
    # Several rows at once, joining together and leaving at different steps: the same tokens.
    rows = [Greedy(p, n) for p, n in zip(turns, (5, 12, 8))]
    run_rows(BatchEngine(shard, prefix_cache_bytes=0), rows)
    assert [r.tokens for r in rows] == [a[:n] for a, n in zip(alone, (5, 12, 8))]
    # Answers to one prompt (`n`): the first leaves its prompt's cache for the others, which prefill nothing.
    rows = [Greedy(turns[0], 12) for _ in range(3)]
    rows[0].share_prefill = True
    run_rows(BatchEngine(shard, prefix_cache_bytes=per_token * 60), rows)
    assert [r.cached_tokens for r in rows] == [0, len(turns[0]) - 1, len(turns[0]) - 1]
    assert all(r.tokens == alone[0] for r in rows)
    # A one-token prompt prefills nothing, so it has nothing to share: the batch goes on.
    rows = [Greedy([5], 3), Greedy([5], 3)]
    rows[0].share_prefill = True
    run_rows(BatchEngine(shard, prefix_cache_bytes=per_token * 60), rows)
    assert rows[0].tokens == rows[1].tokens and len(rows[0].tokens) == 3


def test_a_long_prompt_joins_in_chunks_while_the_batch_keeps_decoding(tiny_model):
    from workers.lockstep import BatchEngine
    from workers.shard import load_shard

    shard = load_shard(tiny_model)
    short, long = list(range(200, 205)), list(range(300, 364))  # the long prompt is 8 chunks of 8

    def engine():
        return BatchEngine(shard, prefix_cache_bytes=0, prefill_chunk=8)

    alone = []
    for prompt, n in ((short, 30), (long, 6)):
        row = Greedy(prompt, n)
        run_rows(engine(), [row])
        alone.append(row.tokens)
    log: list[str] = []

    class Logged(Greedy):
        def on_token(self, token: int) -> bool:
            log.append("short" if self.prompt is short else "long")
            return super().on_token(token)

    rows = [Logged(short, 30), Logged(long, 6)]
    run_rows(engine(), rows)
    assert [r.tokens for r in rows] == alone
    # The long prompt joined while the short one ran (one join per step): its 8 chunks took 8 steps, in each
    # of which the short row decoded a token, instead of one stall before the short row's second token.
    assert log.index("long") >= 8 and log[:8] == ["short"] * 8


def test_requests_waiting_together_join_as_one_group(tiny_model):
    """Prompts of different lengths, one of them from the prefix cache, prefilled together (right-padded, then
    rolled into the batch's left padding), in one chunk and over several: each gets the tokens it gets alone, and all
    first tokens come out of the same step."""
    from workers.lockstep import BatchEngine, admit_from
    from workers.shard import load_shard

    shard = load_shard(tiny_model)
    base = list(range(100, 106))
    prompts = [list(range(200, 205)), base + [7, 8], list(range(300, 307)), [9]]  # 4 x 8 tokens padded: one group
    alone = []
    for prompt in prompts:
        row = Greedy(prompt, 10)
        run_rows(BatchEngine(shard, prefix_cache_bytes=0), [row])
        alone.append(row.tokens)
    log: list[int] = []

    class Logged(Greedy):
        def on_token(self, token: int) -> bool:
            log.append(prompts.index(self.prompt))
            return super().on_token(token)

    for chunk in (512, 8):  # one chunk; then 4 chunks of 2 columns (8 tokens a step, over 4 rows)
        engine = BatchEngine(shard, prefix_cache_bytes=1 << 20, prefill_chunk=chunk)
        run_rows(engine, [Greedy(base, 4)])  # leaves `base` and its answer in the prefix cache
        log.clear()
        rows = [Logged(p, 10) for p in prompts]
        run_rows(engine, rows)
        assert [r.tokens for r in rows] == alone
        assert [r.cached_tokens for r in rows] == [0, len(base), 0, 0]
        assert sorted(log[:4]) == [0, 1, 2, 3]  # one group, one first step: no row had a second token before

        # The first of several answers to a prompt (`n`) ends its group, so the next starts from its cache.
        first, second = Greedy(prompts[2], 10), Greedy(prompts[2], 10)
        first.share_prefill = True
        rows = [Greedy(prompts[0], 10), first, second]
        run_rows(BatchEngine(shard, prefix_cache_bytes=1 << 20, prefill_chunk=chunk), rows)
        assert [r.cached_tokens for r in rows] == [0, 0, len(prompts[2]) - 1]
        assert [r.tokens for r in rows] == [alone[0], alone[2], alone[2]]

    # A group whose requests are all cancelled stops its prefill; the row already running is untouched.
    left: list[str] = []

    class Cancellable(Greedy):
        def on_leave(self, reason: str) -> None:
            left.append(reason)

    doomed = [Cancellable(list(range(300 + 30 * i, 313 + 30 * i)), 6) for i in range(2)]  # 3 chunks of 2 x 4
    for row in doomed:
        row.cancelled = threading.Event()

    class Canceller(Greedy):
        def on_token(self, token: int) -> bool:
            if len(self.tokens) == 1:  # they arrive while this row runs, and join together at the next step
                waiting.extend(doomed)
            elif len(self.tokens) == 2:  # their group has had one of its three chunks
                for row in doomed:
                    row.cancelled.set()
            return super().on_token(token)

    runner = Canceller(prompts[0], 10)
    engine = BatchEngine(shard, prefix_cache_bytes=0, prefill_chunk=8)
    waiting = [runner]
    engine.run(admit_from(waiting))
    assert left == ["cancelled", "cancelled"] and all(r.tokens == [] for r in doomed)
    assert runner.tokens == alone[0] and engine.prefilling is None


def test_a_prefill_stops_when_its_request_is_cancelled(tiny_model):
    from workers.lockstep import BatchEngine
    from workers.shard import load_shard

    shard = load_shard(tiny_model)
    alone = Greedy(list(range(200, 205)), 20)
    run_rows(BatchEngine(shard, prefix_cache_bytes=0, prefill_chunk=8), [alone])
    left: list[str] = []

    class Cancellable(Greedy):
        cancelled = None  # this row's own event, set below

        def on_leave(self, reason: str) -> None:
            left.append(reason)

    doomed = Cancellable(list(range(300, 364)), 6)  # 8 chunks of 8
    doomed.cancelled = threading.Event()

    class Canceller(Greedy):
        def on_token(self, token: int) -> bool:
            if len(self.tokens) == 3:
                doomed.cancelled.set()  # mid-prefill: the long prompt has had about 3 of its 8 chunks
            return super().on_token(token)

    runner = Canceller(list(range(200, 205)), 20)
    engine = BatchEngine(shard, prefix_cache_bytes=0, prefill_chunk=8)
    run_rows(engine, [runner, doomed])
    assert left == ["cancelled"] and doomed.tokens == []
    assert runner.tokens == alone.tokens and engine.prefilling is None


def test_a_row_whose_own_work_raises_fails_alone(tiny_model):
    """An exception while sampling or finishing one row ends that request; the others keep their tokens."""
    from workers.lockstep import BatchEngine
    from workers.shard import load_shard

    shard = load_shard(tiny_model)
    prompts = [list(range(200, 205)), list(range(300, 306)), list(range(400, 404))]
    alone = []
    for prompt in prompts:
        row = Greedy(prompt, 10)
        run_rows(BatchEngine(shard, prefix_cache_bytes=0), [row])
        alone.append(row.tokens)

    class Faulty(Greedy):
        greedy = False  # sampled row by row, through choose
        failures: list

        def choose(self, logits):
            if self.where == "choose" and len(self.tokens) == 3:
                raise ValueError("this row's sampler is broken")
            return super().choose(logits)

        def on_token(self, token: int) -> bool:
            if self.where == "on_token" and len(self.tokens) == 3:
                raise RuntimeError("this row's detokenizer is broken")
            return super().on_token(token)

        def fail(self, exc: Exception) -> None:
            self.failures.append(exc)

    for where in ("choose", "on_token"):
        faulty = Faulty(list(range(500, 507)), 10)
        faulty.where, faulty.failures = where, []
        rows = [Greedy(prompts[0], 10), faulty, Greedy(prompts[1], 10), Greedy(prompts[2], 10)]
        run_rows(BatchEngine(shard, prefix_cache_bytes=0), rows)
        assert [r.tokens for r in rows[:1] + rows[2:]] == alone
        assert len(faulty.failures) == 1 and len(faulty.tokens) == 3
