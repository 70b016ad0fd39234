"""The clients agent frameworks are built on, unchanged, against the session's server: Anthropic's SDK on
`/v1/messages` (ingress/anthropic.py), and LangChain's `ChatOpenAI` with tools and structured output."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
from langchain_core.messages import ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.conftest import MODEL
from tests.test_tools import TOOLS, WEATHER

ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city now", "input_schema": WEATHER}


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="not-needed", max_retries=0,
                               timeout=300)


def test_anthropic_messages_plain_and_streamed(claude, client):
    message = claude.messages.create(model=MODEL, max_tokens=24, extra_body={"temperature": 0}, messages=ASK,
                                     system="You are a helpful assistant.")
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason in ("end_turn", "max_tokens") and "Paris" in message.content[0].text
    # The same answer as the OpenAI endpoint gives for the same messages.
    same = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, *ASK])
    assert message.content[0].text == same.choices[0].message.content
    assert message.usage.input_tokens == same.usage.prompt_tokens
    with claude.messages.stream(model=MODEL, max_tokens=24, extra_body={"temperature": 0}, messages=ASK,
                                system="You are a helpful assistant.") as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text and final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens
    # A stop sequence is named as Anthropic names it.
    cut = claude.messages.create(model=MODEL, max_tokens=24, extra_body={"temperature": 0}, messages=ASK,
                                 stop_sequences=["Paris"])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == "Paris"


def test_anthropic_tool_use_forced_streamed_and_answered(claude):
    asked = dict(model=MODEL, max_tokens=80, extra_body={"temperature": 0}, tools=[WEATHER_TOOL],
                 tool_choice={"type": "tool", "name": "get_weather"},
                 messages=[{"role": "user", "content": "What is the weather like in Paris?"}])
    message = claude.messages.create(**asked)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    with claude.messages.stream(**asked) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(use.name, use.input)]
    # The next turn: the call and its result in the history.
    answer = claude.messages.create(model=MODEL, max_tokens=30, extra_body={"temperature": 0}, tools=[WEATHER_TOOL],
                                    messages=[
        *asked["messages"], {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C, sunny"}]}],
        tool_choice={"type": "none"})
    assert answer.content[0].type == "text" and answer.content[0].text


def test_anthropic_errors_are_anthropics(claude):
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=ASK)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, extra_body={"temperature": 1.5})
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "temperature" in bad.value.message
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])


class City(BaseModel):
    """A city and the country it is in."""

    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


def test_langchain_tools_and_structured_output(server):
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="not-needed", temperature=0, max_tokens=80,
                     max_retries=0)
    message = llm.bind_tools([TOOLS[0]], tool_choice="get_weather").invoke("What is the weather like in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER)
    # The agent loop's next turn goes through LangChain's own message types.
    answer = llm.invoke(["What is the weather like in Paris?", message,
                         ToolMessage(content=json.dumps({"temperature": 21}), tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.content
    city = llm.with_structured_output(City).invoke("What is the capital of France, and its country?")
    assert isinstance(city, City) and city.city


def test_openai_responses_plain_streamed_tools_and_format(client):
    asked = dict(model=MODEL, input="What is the capital of France?", instructions="You are a helpful assistant.",
                 temperature=0, max_output_tokens=24)
    response = client.responses.create(**asked)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    same = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, *ASK])
    assert response.output_text == same.choices[0].message.content and "Paris" in response.output_text
    assert response.usage.input_tokens == same.usage.prompt_tokens
    # Streamed: the SDK's typed events, text deltas adding up to the same text, the completed response last.
    events = list(client.responses.create(**asked, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # A forced function call, then its output in the next input.
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city now",
            "parameters": WEATHER, "strict": True}
    question = [{"role": "user", "content": "What is the weather like in Paris?"}]
    called = client.responses.create(model=MODEL, input=question, tools=[tool], tool_choice="required",
                                     temperature=0, max_output_tokens=80)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    streamed = [e for e in client.responses.create(model=MODEL, input=question, tools=[tool], tool_choice="required",
                                                   temperature=0, max_output_tokens=80, stream=True)
                if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in streamed] == [call.arguments]
    answer = client.responses.create(model=MODEL, tools=[tool], tool_choice="none", temperature=0,
                                     max_output_tokens=30, input=[*question, call.model_dump(), {
                                         "type": "function_call_output", "call_id": call.call_id, "output": "21 C"}])
    assert answer.output_text
    # text.format: the answer is JSON of the schema.
    city = client.responses.create(model=MODEL, input="The capital of France, with its country?", temperature=0,
                                   max_output_tokens=60, text={"format": {
                                       "type": "json_schema", "name": "city", "schema": City.model_json_schema()}})
    City.model_validate_json(city.output_text)
    # A response continued by its id: the model sees the first question and answer before the new input.
    follow = client.responses.create(model=MODEL, input="And Germany?", previous_response_id=response.id,
                                     temperature=0, max_output_tokens=16)
    again = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0, messages=[
        *ASK, {"role": "assistant", "content": response.output_text}, {"role": "user", "content": "And Germany?"}])
    assert follow.output_text == again.choices[0].message.content
    assert follow.usage.input_tokens == again.usage.prompt_tokens
    # One asked not to be stored, or one that never was, cannot be continued; nor one of an id no response has, long
    # enough to overrun NATS's limit on a command, which would close the connection every request shares.
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    for response_id in (unstored.id, "resp_nothing", "resp_" + "0" * 5000):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=MODEL, input="And Germany?", previous_response_id=response_id)
        assert refused.value.param == "previous_response_id"


def test_a_streamed_response_with_text_after_a_call_keeps_its_items_apart():
    """Text may follow a call (or a span that was not one): each message item has its own id, and the completed
    Response's output is the items as they were streamed, each event valid as the `openai` SDK's types."""
    from pydantic import TypeAdapter
    from openai.types.responses import ResponseStreamEvent

    from ingress.responses import ResponsesStream
    from schemas.jobs import Done, Job
    from schemas.openai import ChatMessage, FunctionCall, ToolCall, Usage

    job = Job(id="resp_abc", model=MODEL, reply_subject="r", kind="chat",
              messages=[ChatMessage(role="user", content="hi")])
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}'))
    done = Done(id=job.id, text="Checking. Done.", finish_reason="tool_calls", tool_calls=[call], ttft_ms=1.0,
                duration_ms=2.0, worker="w", usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7))
    stream = ResponsesStream()
    data = b"".join([stream.chunk(job, role=True), stream.chunk(job, text="Checking."),
                     stream.chunk(job, call=(0, call)), stream.chunk(job, text=" Done."), stream.finish(job, done, False)])
    events = [TypeAdapter(ResponseStreamEvent).validate_json(block.split(b"\ndata: ", 1)[1])
              for block in data.strip().split(b"\n\n")]
    finished = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in finished] == ["message", "function_call", "message"]
    assert len({i.id for i in finished}) == 3
    assert [i.id for i in events[-1].response.output] == [i.id for i in finished]
    assert events[-1].response.output_text == "Checking. Done."
