"""Overload behaves like a service, not a hang: 429 with Retry-After when a request could not start in time,
and a server default for max_tokens. One deployment of its own: one job at a time, no queueing allowed."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import FRANCE, MODEL, start_server

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def busy(server, tmp_path_factory):
    # --max-queue-wait 0: any request that would have to wait for a place in the batch is answered 429.
    srv = start_server(tmp_path_factory.mktemp("busy"), "--model", str(server.home / "models" / MODEL),
                       "--max-batch", "1", "--max-queue-wait", "0", "--default-max-tokens", "6")
    yield srv
    assert srv.stop() == 0


def test_a_request_without_max_tokens_gets_the_server_default(busy):
    reply = httpx.post(busy.base_url + "/chat/completions", timeout=300,
                       json={"model": MODEL, "messages": STORY, "temperature": 0}).json()
    assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
    # A request may still ask for more, up to the context.
    reply = httpx.post(busy.base_url + "/chat/completions", timeout=300,
                       json={"model": MODEL, "messages": STORY, "temperature": 0, "max_tokens": 9}).json()
    assert reply["usage"]["completion_tokens"] == 9


def stream(base_url: str) -> tuple[int, dict, str]:
    """One streamed request: (status, headers, body)."""
    body = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=300) as response:
        return response.status_code, dict(response.headers), response.read().decode()


def test_requests_that_could_not_start_in_time_get_429_with_retry_after_and_the_rest_are_served(busy):
    # The workers' job times are what the estimate is made of: wait until one has been reported.
    deadline = time.monotonic() + 60
    while not any(w["job_s"] > 0 for w in busy.health()["models"][MODEL]["live_workers"]):
        assert time.monotonic() < deadline, "no job time reported"
        time.sleep(0.2)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: stream(busy.base_url), range(6)))
    refused = [(headers, body) for status, headers, body in answers if status == 429]
    served = [body for status, _, body in answers if status == 200]
    assert len(refused) + len(served) == 6 and refused and served
    for headers, body in refused:
        assert int(headers["retry-after"]) >= 1 and '"code":"rate_limit_exceeded"' in body.replace(" ", "")
        assert "x-request-id" in headers
    for body in served:
        assert body.rstrip().endswith("data: [DONE]") and re.search(r'"finish_reason":"(stop|length)"', body)
