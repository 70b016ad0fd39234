"""Log probabilities (chat `logprobs`/`top_logprobs`, completions `logprobs`), streamed and not, and the fields
current SDKs and tools send that change nothing: on the session's deployment, with the `openai` SDK."""

from __future__ import annotations

import math

import openai
import pytest

from tests.conftest import FRANCE, MODEL


def test_chat_logprobs_are_the_greedy_choice_with_its_alternatives(client):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert entries and "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # At temperature 0 the chosen token is the most likely one: first among the alternatives (or tied with it).
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-6)
        assert entry.token in [t.token for t in entry.top_logprobs if math.isclose(t.logprob, entry.logprob, abs_tol=1e-6)]
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    # The same request streamed brings the same tokens, with the text of the chunks that carry them.
    stream = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-3) for a, b in zip(streamed, entries))


def test_chat_without_logprobs_has_none_and_logprobs_alone_lists_no_alternatives(client):
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None
    alone = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0.7, seed=3, max_tokens=6,
                                           logprobs=True)
    entries = alone.choices[0].logprobs.content
    assert entries and all(e.top_logprobs == [] and e.logprob <= 0 for e in entries)


def test_filters_leave_the_reported_distribution_whole(client):
    """top_p/top_k remove tokens from the draw, not from what is reported: every alternative has a finite value."""
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=1.0, top_p=0.3, seed=1, extra_body={"top_k": 2},
                                           max_tokens=8, logprobs=True, top_logprobs=5)
    entries = reply.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 5 for e in entries)
    assert all(-9999 < t.logprob <= 0 for e in entries for t in e.top_logprobs)


def test_completion_logprobs_in_the_legacy_shape(client):
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset)
    # Offsets count from the prompt's start, as OpenAI's: the answer's first token is at the prompt's length.
    assert logprobs.text_offset[0] == len(prompt) and logprobs.text_offset == sorted(logprobs.text_offset)
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 2 and math.isclose(top[token], chosen, abs_tol=1e-6) and chosen == max(top.values())


@pytest.mark.parametrize("fields, param", [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 3}, "logprobs"),  # chat's is a boolean
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(http, fields, param):
    response = http.post("/chat/completions", json={"model": MODEL, "messages": FRANCE, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_completions_logprobs_beyond_five_is_refused(http):
    response = http.post("/completions", json={"model": MODEL, "prompt": "Hi", "logprobs": 6})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_fields_that_change_nothing_are_accepted(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=12, service_tier="auto", store=False,
        metadata={"team": "audit"}, user="u-1", modalities=["text"],
        extra_body={"prompt_cache_key": "k-1", "safety_identifier": "s-1"})
    assert "Paris" in reply.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=FRANCE, extra_body={"service_tier": "fastest"})
    assert refused.value.param == "service_tier"
