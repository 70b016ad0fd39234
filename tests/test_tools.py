"""Tool calling (workers/tools.py): a forced call is a valid call even from a 135M model whose template knows no
tools; the agent loop's next turn (the call and its result in the history) is answered; a streamed call is the
same call; what OpenAI refuses is a 400 naming it. On the session's deployment, with the `openai` SDK, and as a
NATS job."""

from __future__ import annotations

import json
import shutil
import time

import jsonschema
import msgspec
import pytest

from pipeline.subjects import job_subject
from schemas.jobs import Done, Failed, Job, SamplingParams
from schemas.openai import ChatMessage, Tool, ToolCall
from tests.conftest import MODEL, SUBMITTER
from tests.test_durability import final_event
from workers.tools import FORCED, CallSplitter

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


def check_calls(calls) -> None:
    """Each call names a given function and its arguments validate against that function's schema."""
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_forced_call_is_valid_and_the_next_turn_is_answered(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                           temperature=0, max_tokens=80)
    choice = reply.choices[0]
    # A named function's call finishes with "stop", as OpenAI's ("tool_calls" when the model chose to call).
    assert choice.finish_reason == "stop" and choice.message.content is None, choice
    check_calls(choice.message.tool_calls)
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    # The agent loop's next request: the call and its result in the history; the model answers in text.
    call = choice.message.tool_calls[0]
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    # The call and its result are in the prompt the model saw: more than the question alone.
    alone = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_required_calls_one_of_the_tools_and_a_stream_brings_the_same_calls(client):
    asked = dict(model=MODEL, messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=TOOLS,
                 tool_choice="required", temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**asked).choices[0]
    assert whole.finish_reason == "tool_calls"
    check_calls(whole.message.tool_calls)
    # Streamed as OpenAI streams calls: a delta with the call's index, id and name, then its arguments.
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**asked, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] = call["name"] or (delta.function.name if delta.function else None)
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_without_parallel_calls_there_is_one(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=3, max_tokens=80)
    assert len(reply.choices[0].message.tool_calls) == 1
    check_calls(reply.choices[0].message.tool_calls)


@pytest.mark.parametrize("body, param, words", [
    ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": []}, "tools", "empty array"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools[0].function.parameters", "not"),
    ({"tools": [{"type": "function", "function": {"name": "a name"}}]}, "tools", "name"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "tools"),
])
def test_what_openai_refuses_about_tools_is_a_400_naming_it(http, body, param, words):
    response = http.post("/chat/completions", json={"model": MODEL, "messages": QUESTION, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and words in error["message"] + error["param"], error


async def test_a_nats_job_gets_tool_calls_too(server):
    nc = await server.connect()
    try:
        reply = f"conclave.replies.{SUBMITTER}.tools-1"
        sub = await nc.subscribe(reply)
        tools = [msgspec.convert(t, Tool) for t in TOOLS]
        job = Job(id="tools-1", model=MODEL, reply_subject=reply, kind="chat", stream=False, created=time.time(),
                  messages=[ChatMessage(role="user", content="Weather in Rome?")], tools=tools, tool_choice="required",
                  params=SamplingParams(temperature=0, max_tokens=80))
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job),
                                     headers={"Nats-Msg-Id": job.id})
        done = await final_event(sub)
        assert isinstance(done, Done) and done.finish_reason == "tool_calls", done
        check_calls(done.tool_calls)
        # A named function that is not among the tools is the job's error, on its reply subject.
        bad = msgspec.structs.replace(job, id="tools-2", tool_choice={"type": "function", "function": {"name": "x"}})
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(bad),
                                     headers={"Nats-Msg-Id": bad.id})
        failed = await final_event(sub)
        assert isinstance(failed, Failed) and failed.status == 400 and failed.error.param == "tool_choice"
        # Several answers (`params.n`): the first in Done's own fields, the others in `choices`, usage of all.
        several = msgspec.structs.replace(job, id="tools-3", tools=None, tool_choice="auto", params=SamplingParams(
            temperature=1.0, seed=5, max_tokens=6, n=3))
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(several),
                                     headers={"Nats-Msg-Id": several.id})
        done = await final_event(sub)
        assert isinstance(done, Done) and [c.index for c in done.choices] == [1, 2], done
        assert done.usage.completion_tokens > 6  # more than one answer of at most 6 tokens
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    finally:
        await nc.close()


def split(pieces: list[str]) -> tuple[str, list]:
    splitter = CallSplitter(FORCED, [msgspec.convert(TOOLS[0], Tool)])
    text, calls = "", []
    for piece in pieces:
        out, made = splitter.feed(piece)
        text, calls = text + out, calls + made
    out, made = splitter.flush()
    return text + out, [(c.function.name, json.loads(c.function.arguments)) for c in calls + made]


def test_the_call_splitter_passes_text_and_holds_only_what_may_be_a_call():
    call = '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]'
    # Markers split across pieces; text around the call passes through.
    assert split(["Let me check. <tool", "_call>" + call[:20], call[20:] + "</tool_", "call> Done."]) == (
        "Let me check.  Done.", [("get_weather", {"city": "Oslo", "unit": "celsius"})])
    # What only looked like a marker is text; a call to a function not offered, or not JSON, is text, not dropped.
    assert split(["a <tool", "box> b"]) == ("a <toolbox> b", [])
    assert split(['<tool_call>[{"name": "rm_rf", "arguments": {}}]</tool_call>']) == (
        '<tool_call>[{"name": "rm_rf", "arguments": {}}]</tool_call>', [])
    assert split(["<tool_call>[{broken"]) == ("<tool_call>[{broken", [])
    # An answer cut inside a call that is complete JSON still makes it; "[]" calls nothing.
    assert split(["<tool_call>" + call]) == ("", [("get_weather", {"city": "Oslo", "unit": "celsius"})])
    assert split(["<tool_call>[]</tool_call>"]) == ("", [])


# A Qwen-like template that knows tools: mlx-lm finds `<tool_call>` and `tool_call.name` in it (its json_tools parser).
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for tool_call in m.tool_calls or [] %}{% set tool_call = tool_call.function %}<tool_call>\n"
    "{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_knows_tools_renders_them_and_its_markers_read_the_calls(server, tmp_path):
    from mlx_lm.utils import load_tokenizer

    from workers.tools import call_format, template_inputs

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(server.home / "models" / MODEL / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.has_tool_calling
    tools = [msgspec.convert(TOOLS[0], Tool)]
    job = Job(id="t", model=MODEL, reply_subject="r", kind="chat", tools=tools, messages=[
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(role="assistant", tool_calls=[msgspec.convert(
            {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}, ToolCall)]),
        ChatMessage(role="tool", tool_call_id="call_1", content="5 C")])
    messages, extra = template_inputs(job, tokenizer)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    # The template's own rendering: the tools, the past call's arguments as an object, the tool's turn.
    assert "<tools>get_weather </tools>" in text and '"arguments": {"city": "Oslo"}' in text
    assert "<|im_start|>tool\n5 C" in text
    # Its answers are read with its own markers and parser; a forced call is in the grammar's format whatever the model.
    splitter = CallSplitter(call_format(job, tokenizer), tools)
    text, calls = splitter.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert text == "" and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"})]
    assert call_format(msgspec.structs.replace(job, tool_choice="required"), tokenizer) is FORCED


def test_a_conversation_the_template_refuses_is_a_400_naming_the_messages(server, tmp_path):
    # Templates refuse what their model cannot take (`raise_exception`: Mistral's strict alternation of turns, Llama
    # 3.1's one call per turn): the request's fault, a 400, never a 500 that SDKs retry.
    from mlx_lm.utils import load_tokenizer

    from workers.prepare import JobError, prompt_tokens

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(server.home / "models" / MODEL / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    alternating = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": alternating}))
    tokenizer = load_tokenizer(tmp_path)
    job = Job(id="t", model=MODEL, reply_subject="r", kind="chat", messages=[
        ChatMessage(role="user", content="Weather in Oslo?"), ChatMessage(role="user", content="And in Bergen?")])
    with pytest.raises(JobError) as refused:
        prompt_tokens(job, tokenizer)
    assert (refused.value.status, refused.value.detail.param) == (400, "messages")
    assert "must alternate" in refused.value.detail.message
    assert prompt_tokens(msgspec.structs.replace(job, messages=job.messages[:1]), tokenizer)
