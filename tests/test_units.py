"""Pure functions: stop matching, error translation, subject names."""

from __future__ import annotations

import msgspec
import pytest

from ingress.errors import validation_error
from pipeline.subjects import job_subject, subject_token
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


def test_subject_names_are_single_tokens():
    assert subject_token("org/Model-1.5B v2") == "org_Model-1_5B_v2"
    assert job_subject("a.b") == "conclave.jobs.a_b"
