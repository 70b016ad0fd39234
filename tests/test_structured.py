"""Structured outputs (`response_format` json_object and json_schema, workers/constrain.py): the answer always
parses and validates, even from a 135M model; what the engine cannot honour is a 400 naming it. On the session's
deployment, with the `openai` SDK, and as a NATS job."""

from __future__ import annotations

import json
import time

import jsonschema
import msgspec
import pytest

from pipeline.subjects import job_subject
from schemas.jobs import Done, Failed, Job, SamplingParams
from schemas.openai import ChatMessage
from tests.conftest import MODEL, SUBMITTER
from tests.test_durability import final_event

CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                     "number": {"type": "integer", "minimum": 1, "maximum": 9999}},
                    "required": ["street", "number"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "sure": {"type": "boolean"}},
             "required": ["colour", "sure"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"primes": {"type": "array", "items": {"type": "integer", "maximum": 999},
                                                          "minItems": 3, "maxItems": 5}},
              "required": ["primes"], "additionalProperties": False},
}


def ask(client, schema: dict | None, question: str, **options):
    response_format = ({"type": "json_object"} if schema is None else
                       {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          response_format=response_format, max_tokens=120, **options)


def test_json_object_answers_parse(client):
    reply = ask(client, None, "Give France's capital as a JSON object with the key \"capital\".", temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("name, options", [(name, {"temperature": 0}) for name in sorted(SCHEMAS)]
                         + [("nested", {"temperature": 1.0, "seed": 5})])  # sampled too: any draw stays in the grammar
def test_json_schema_answers_validate(client, name, options):
    reply = ask(client, SCHEMAS[name], f"Give an example answer ({name}).", **options)
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS[name])


def test_the_answer_follows_the_schema_and_the_question(client):
    reply = ask(client, CITY, "What is the capital of France? Answer with the city and its country.", temperature=0)
    answer = json.loads(reply.choices[0].message.content)
    jsonschema.validate(answer, CITY)
    assert "Paris" in answer["city"]


def test_a_streamed_schema_answer_is_the_same(client):
    whole = ask(client, CITY, "The capital of Italy?", temperature=0).choices[0].message.content
    stream = ask(client, CITY, "The capital of Italy?", temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


@pytest.mark.parametrize("response_format, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}},
     "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}, "strange"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {  # the schema cannot loosen the engine
        "type": "object", "not": {"required": ["a"]}, "x-guidance": {"lenient": True}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "description": "x" * 100_001}}},
     "larger"),
    ({"type": "json_schema", "json_schema": {"name": "a name", "schema": {"type": "object"}}}, "name"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "yaml"}, "type"),
])
def test_what_the_engine_cannot_honour_is_a_400_naming_it(http, response_format, words):
    response = http.post("/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                    "response_format": response_format})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith("response_format") and words in error["message"] + error["param"], error


def test_a_wide_object_is_honoured(client):
    """600 optional properties: beyond the parser's default row limit (2,000 items), which fails a request only once
    its answer reaches the object's keys, right after `{"`. Eight tokens get there."""
    wide = {"type": "object", "properties": {f"field_{i}": {"type": "integer", "maximum": 9} for i in range(600)},
            "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Fill in some fields."}], temperature=0, max_tokens=8,
        response_format={"type": "json_schema", "json_schema": {"name": "wide", "schema": wide}})
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content.startswith('{"field_')


async def test_a_nats_job_gets_the_schema_and_the_logprobs_too(server):
    """An internal system on NATS asks what the HTTP client asks: `params.json_schema` and `params.logprobs`."""
    nc = await server.connect()
    try:
        reply = f"conclave.replies.{SUBMITTER}.schema-1"
        sub = await nc.subscribe(reply)
        job = Job(id="schema-1", model=MODEL, reply_subject=reply, kind="chat", stream=False, created=time.time(),
                  messages=[ChatMessage(role="user", content="The capital of France, with its country?")],
                  params=SamplingParams(temperature=0, max_tokens=60, json_schema=CITY, logprobs=1))
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job),
                                     headers={"Nats-Msg-Id": job.id})
        done = await final_event(sub)
        assert isinstance(done, Done), done
        jsonschema.validate(json.loads(done.text), CITY)
        assert "".join(e.token for e in done.logprobs) == done.text and all(len(e.top_logprobs) == 1 for e in done.logprobs)
        # A schema the engine cannot honour is the job's error, on its reply subject.
        bad = msgspec.structs.replace(job, id="schema-2", params=SamplingParams(json_schema={"type": "nope"}))
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(bad), headers={"Nats-Msg-Id": bad.id})
        failed = await final_event(sub)
        assert isinstance(failed, Failed) and failed.status == 400 and failed.error.param == "response_format"
    finally:
        await nc.close()
