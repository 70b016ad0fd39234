"""Every bad input gets OpenAI's error object with the right status, and the server keeps serving."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import FRANCE, MODEL


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def still_serves(client):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": MODEL, "messages": FRANCE, "max_tokens": "three"}, "max_tokens", "invalid_type"),
        ({"model": MODEL, "messages": "hello"}, "messages", "invalid_type"),
        ({"model": MODEL}, "messages", "missing_required_parameter"),
        ({"model": MODEL, "messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"model": MODEL, "messages": FRANCE, "temperature": 7}, "temperature", "invalid_value"),
        ({"model": MODEL, "messages": FRANCE, "n": 17}, "n", "invalid_value"),
        ({"model": MODEL, "messages": FRANCE, "n": 0}, "n", "invalid_value"),
        ({"model": MODEL, "messages": FRANCE, "max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"model": MODEL, "messages": FRANCE, "frobnicate": True}, "frobnicate", "unknown_parameter"),
        ({"model": MODEL, "messages": []}, "messages", "empty_array"),
        ({"model": MODEL, "messages": FRANCE, "stop": [f"stop {i}" for i in range(17)]}, "stop", "invalid_value"),
        ({"model": MODEL, "messages": FRANCE, "stop": ["x" * 257]}, "stop", "invalid_value"),
    ],
)
def test_invalid_request_names_the_param(http, client, body, param, code):
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    still_serves(client)


def test_invalid_json(http, client):
    response = http.post("/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and "parse the JSON body" in error["message"]
    still_serves(client)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-imaginary", messages=FRANCE)
    assert caught.value.code == "model_not_found"
    assert "gpt-imaginary" in caught.value.message
    still_serves(client)


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded(client, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8190, stream=stream)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    assert "8192" in caught.value.message
    long_prompt = "word " * 9000
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "prompt"
    # More messages than the context has tokens: refused before the template renders them (it took seconds).
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ""}] * 9000, max_tokens=1)
    assert caught.value.code == "context_length_exceeded" and "at least 9000 tokens" in caught.value.message
    still_serves(client)


def test_unsupported_feature_is_explicit(http, client):
    for field, value in (("echo", True), ("best_of", 2)):
        response = http.post("/completions", json={"model": MODEL, "prompt": "Hi", field: value})
        assert response.status_code == 400 and error_of(response)["param"] == field
        assert error_of(response)["code"] == "unsupported_parameter"
    still_serves(client)


def test_unknown_route_is_openai_shaped(http):
    response = http.get("/embeddings")
    assert response.status_code in (404, 405)
    error_of(response)
    # A known route asked with another method: 405 with the methods it takes (RFC 9110), in the same shape.
    response = http.get("/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    error_of(response)
