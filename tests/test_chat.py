"""The OpenAI API as the official SDK sees it, against a live server."""

from __future__ import annotations

from tests.conftest import FRANCE, MODEL


def greedy(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, **kwargs)


def test_greedy_chat_answers_paris(client, tokenizer):
    reply = greedy(client)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")
    # usage is exact: the chat template's tokens in, the generated tokens (with the end token) out.
    prompt_ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(tokenizer.encode(choice.message.content)) + 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_equals_non_stream(client):
    whole = greedy(client).choices[0].message.content
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_stop_sequence_cuts_output(client):
    whole = greedy(client).choices[0].message.content
    cut = greedy(client, stop=[" Paris", "never-appears"])
    assert cut.choices[0].message.content == whole[: whole.index(" Paris")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy(client, stop=" Paris", stream=True))
    assert streamed == cut.choices[0].message.content


def test_max_tokens_gives_length(client):
    reply = greedy(client, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    reply = greedy(client, max_completion_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_content_as_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=parts, temperature=0)
    assert reply.choices[0].message.content == greedy(client).choices[0].message.content



def test_completions_endpoint(client, tokenizer):
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4)
    assert reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert reply.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=4, stream=True) if c.choices)
    assert streamed == reply.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompt), temperature=0, max_tokens=4)
    assert ids.choices[0].text == reply.choices[0].text


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["nats"] == "connected"
    assert health["models"][MODEL]["live_workers"][0]["context_length"] == 8192

def test_seeded_sampling_repeats(client):
    def sample():
        return client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=1.0, top_p=0.9, seed=1234,
                                              max_tokens=12, extra_body={"top_k": 40, "min_p": 0.05})

    assert sample().choices[0].message.content == sample().choices[0].message.content


def test_n_answers_are_rows_of_their_own_repeatable_with_a_seed_and_streamed_alike(client):
    asked = dict(model=MODEL, messages=FRANCE, temperature=1.0, seed=7, max_tokens=10, n=3)
    first, again = client.chat.completions.create(**asked), client.chat.completions.create(**asked)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # repeatable: each answer draws from seed + index
    assert len(set(texts)) > 1  # ... and its own draws
    # The first answer is what n=1 with the same seed gives; usage counts every answer's tokens, the prompt once.
    one = client.chat.completions.create(**{**asked, "n": 1})
    assert texts[0] == one.choices[0].message.content
    assert first.usage.prompt_tokens == one.usage.prompt_tokens
    assert first.usage.completion_tokens > one.usage.completion_tokens
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    # Streamed: each chunk names its answer; every answer reassembles to the same text and has its finish.
    parts, finishes = {}, {}
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            parts[choice.index] = parts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [parts[i] for i in range(3)] == texts
    assert finishes == {i: c.finish_reason for i, c in enumerate(first.choices)}
