"""Continuous batching and the prefix cache, against the live server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

from tests.conftest import FRANCE, MODEL, wait_for_audit_record

# Short raw prompts (a chat template would add about 30 tokens of prefill to each on this slow CPU), with
# different lengths, budgets and one stop rule, so that rows join and leave the batch at different steps.
PROMPTS = [
    ("The capital of France is", 10, None), ("Once upon a time", 14, None), ("1, 2, 3, 4,", 12, None),
    ("Roses are red,", 13, "\n"), ("def fibonacci(n):", 16, None), ("Water boils at", 9, None),
    ("The largest planet in our solar system", 11, None), ("The opposite of hot is", 6, None),
]


def complete(client, prompt: str, max_tokens: int, stop: str | None, events: list | None = None) -> str:
    """Stream one greedy completion; with `events`, note (prompt, "first" | "last") as text arrives."""
    parts = []
    stream = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=max_tokens,
                                       stop=stop, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            if events is not None and not parts:
                events.append((prompt, "first"))
            parts.append(chunk.choices[0].text)
    if events is not None:
        events.append((prompt, "last"))
    return "".join(parts)


def test_concurrent_greedy_requests_match_sequential_ones(client):
    alone = [complete(client, *p) for p in PROMPTS]
    events: list = []  # from one client thread per prompt, in the order the text arrived (list.append is atomic)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(client, *p, events=events), PROMPTS))
    assert together == alone
    assert all(alone)
    # They really ran together: a request served one at a time would finish before the next one's first
    # text. Count the requests whose first text came while another request was still producing text.
    running, overlapped = set(), set()
    for prompt, kind in events:
        if kind == "first":
            if running:
                overlapped.add(prompt)
            running.add(prompt)
        else:
            running.discard(prompt)
    assert len(overlapped) >= len(PROMPTS) // 2, events


def test_next_chat_turn_reuses_the_cached_prefix(server, client):
    first = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
    turn = FRANCE + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(model=MODEL, messages=turn, temperature=0, max_tokens=16)
    # The first turn's prompt and answer were cached; the new turn prefilled only what it added.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    # And the answer is the one a fresh prefill gives (plain mlx-lm, nothing cached).
    model, tokenizer = load(str(server.home / "models" / MODEL))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # as the worker does on CPU (workers/shard.py: load_shard)
    prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True)
    raw = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=16, sampler=make_sampler(0.0)))
    assert second.choices[0].message.content == raw


def test_seeded_request_draws_the_same_tokens_in_a_batch(client):
    def sampled():
        return client.completions.create(model=MODEL, prompt="Once upon a time", temperature=1.0, seed=99,
                                         max_tokens=12).choices[0].text

    alone = sampled()
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(complete, client, prompt, budget, stop) for prompt, budget, stop in PROMPTS[:3]]
        assert sampled() == alone  # drawn from its own key, whatever else shares the batch
        assert all(o.result() for o in others)


async def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(server, client):
    story = [{"role": "user", "content": "Write a long story about a clockmaker and a crow."}]
    expected = complete(client, "Once upon a time", 40, None)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(complete, client, "Once upon a time", 40, None)
        stream = client.chat.completions.create(model=MODEL, messages=story, temperature=0, max_tokens=4000,
                                                logit_bias={"2": -100}, stream=True)  # cannot end by itself
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()  # the client goes away: the ingress cancels the job, the worker drops its row
        assert other.result() == expected
    asked = story[0]["content"]
    record = await wait_for_audit_record(
        server, lambda r: bool(r.job and r.job.messages and r.job.messages[0].content == asked))
    assert record.outcome == "cancelled" and 0 < record.usage.completion_tokens < 4000, record
