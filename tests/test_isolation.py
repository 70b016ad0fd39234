"""One request never fails the others: every parameter is checked before a job joins a batch."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest

from pipeline.subjects import job_subject
from schemas.jobs import Job, SamplingParams
from schemas.openai import ChatMessage
from tests.conftest import FRANCE, MODEL, SUBMITTER
from tests.test_durability import final_event

EOS = 2  # SmolLM2's <|im_end|>: suppressed below, so that the innocent request outlasts the bad one anywhere


def innocent_and_bad(client, http, bad: dict) -> tuple[str, str, dict]:
    """A long greedy stream is decoding when a request with `bad` parameters arrives. Returns the text the
    stream gives alone (24 tokens), the same stream's text with the bad request beside it, and the bad
    request's response body."""
    common = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "logit_bias": {str(EOS): -100}}
    alone = client.completions.create(**common, max_tokens=24).choices[0].text
    started, answered = threading.Event(), threading.Event()
    parts: list[str] = []

    def stream() -> None:
        # As long as the context allows (EOS suppressed): it is still decoding when the bad request is answered.
        with client.completions.create(**common, max_tokens=4000, stream=True) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].text:
                    parts.append(chunk.choices[0].text)
                    started.set()
                    if answered.is_set() and len("".join(parts)) >= len(alone):
                        return  # closing the stream cancels it

    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream)
        assert started.wait(300)
        response = http.post("/completions", json={**common, "max_tokens": 4, **bad})
        answered.set()
        streaming.result(timeout=600)
    assert response.status_code == 400, response.text
    return alone, "".join(parts), response.json()["error"]


@pytest.mark.parametrize("bad, param", [({"top_k": 50000, "temperature": 1.0}, "top_k"),
                                        ({"top_p": 0.0, "temperature": 1.0}, "top_p"),
                                        ({"repetition_penalty": 0.0}, "repetition_penalty")])
def test_a_bad_parameter_is_refused_while_the_batch_beside_it_goes_on(client, http, bad, param):
    alone, beside, error = innocent_and_bad(client, http, bad)
    assert beside.startswith(alone)
    assert (error["param"], error["code"], error["type"]) == (param, "invalid_value", "invalid_request_error")


def test_logit_bias_keys_that_are_not_integers_are_a_400(http):
    # "²" passes str.isdigit() but not int(): once a 500.
    for key in ("²", "1.5", "x"):
        response = http.post("/completions", json={"model": MODEL, "prompt": "Hi", "logit_bias": {key: 1}})
        assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"


async def test_a_nats_job_with_a_negative_top_k_gets_a_400(server):
    nc = await server.connect()
    try:
        replies = await nc.subscribe("conclave.replies.tests.topk")
        job = Job(id="job-topk", model=MODEL, reply_subject="conclave.replies.tests.topk", kind="chat",
                  messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(top_k=-5),
                  created=time.time())
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        failed = await final_event(replies)
        assert failed.status == 400 and (failed.error.param, failed.error.code) == ("top_k", "invalid_value")
    finally:
        await nc.close()
