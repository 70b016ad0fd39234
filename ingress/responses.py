"""`POST /v1/responses`: OpenAI's Responses API, a thin translation onto the same chat jobs as chat completions.

In: `instructions` is the system message; `input` is a string (one user message) or items: messages (text parts),
`function_call` items (an assistant's tool calls) and `function_call_output` items (`tool` messages); `tools`
(flat function tools), `tool_choice`, `parallel_tool_calls` and `text.format` (chat's `response_format`, flat) map
onto chat's. Out: a Response whose `output` holds a `message` item with `output_text` and `function_call` items,
`status` `incomplete` (reason `max_output_tokens`) when cut; streamed, its typed events with `sequence_number`.
`previous_response_id` continues a response of the last day: its input is kept by its id in CONCLAVE_CONVERSATIONS
(unless `store` is false) and its answer is its job's stored result in CONCLAVE_RESULTS, both as long as results
are (CONCLAVE_RESULTS_TTL_HOURS, default 24).
"""

from __future__ import annotations

import logging
import time

import msgspec
import nats.errors
from nats.js.errors import NotFoundError
from starlette.requests import Request
from starlette.responses import Response

from ingress.errors import APIError, validation_error
from ingress.handlers import model_for, request_limit
from ingress.reading import read_request
from ingress.requests import json_schema_of, made_here, new_job, sampling_params_of
from ingress.respond import respond
from ingress.shapes import Shape
from pipeline.access import INGRESS
from pipeline.settle import stored_result
from pipeline.subjects import CONVERSATIONS_STREAM, conversation_subject
from schemas.jobs import Done, Job
from schemas.openai import (ChatMessage, ErrorDetail, FunctionCall, FunctionDefinition, FunctionName, NamedToolChoice,
                            ResponseFormat, Tool, ToolCall)
from schemas.responses import Conversation, FunctionCallItem, FunctionCallOutputItem, MessageItem, ResponsesRequest

log = logging.getLogger("conclave.ingress")
encode = msgspec.json.Encoder().encode
decode_conversation = msgspec.json.Decoder(Conversation).decode
TEXT_PARTS = ("input_text", "output_text", "text")
RESPONSE_PREFIX = "resp_"
ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}


def parts_text(content: str | list[dict], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"Invalid '{where}[{j}]': this model reads text only (input_text parts), got "
                           f"{part.get('type')!r}.", f"{where}[{j}]", "unsupported_value")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(req: ResponsesRequest, before: list[ChatMessage]) -> list[ChatMessage]:
    """The job's messages: the instructions, the conversation `before` (a previous response's), then the input."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    messages += before
    if isinstance(req.input, str):
        return messages + [ChatMessage(role="user", content=req.input)]
    for i, raw in enumerate(req.input):
        given = raw.get("type", "message")
        kind = ITEMS.get(given) if isinstance(given, str) else None
        if kind is None:
            raise APIError(400, f"Invalid 'input[{i}]': items of type {raw.get('type')!r} are not supported here.",
                           f"input[{i}].type", "unsupported_value")
        try:
            item = msgspec.convert(raw, kind)
        except msgspec.ValidationError as exc:
            error = validation_error(exc)
            raise APIError(400, error.detail.message, f"input[{i}]" + (f".{error.detail.param}" if error.detail.param
                                                                        else ""), error.detail.code) from None
        if isinstance(item, MessageItem):
            messages.append(ChatMessage(role=item.role, content=parts_text(item.content, f"input[{i}].content")))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and (last.tool_calls or not last.content):
                # Calls made together: one assistant turn (appended in place: copying the list for each call made
                # an input of 125,000 calls take 30 s of the event loop).
                last.tool_calls = last.tool_calls or []
                last.tool_calls.append(call)
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        else:
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                        content=parts_text(item.output, f"input[{i}].output")))
    return messages


def responses_job(req: ResponsesRequest, caller: str, before: list[ChatMessage]) -> Job:
    if req.reasoning and req.reasoning.get("effort") is not None:  # as OpenAI answers for a model without reasoning
        raise APIError(400, "Unsupported parameter: 'reasoning.effort' is not supported with this model.",
                       "reasoning.effort", "unsupported_parameter")
    if req.include:
        raise APIError(400, f"Invalid 'include': {req.include[0]!r} is not supported by this server.", "include",
                       "unsupported_value")
    tools = [Tool(type="function", function=FunctionDefinition(name=t.name, description=t.description,
                                                               parameters=t.parameters, strict=t.strict))
             for t in req.tools or []]
    choice = req.tool_choice or "auto"
    if not isinstance(choice, str):
        choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
    fmt = req.text.format if req.text else None
    schema = json_schema_of(ResponseFormat(type=fmt.type, json_schema=fmt.json_schema()) if fmt else None)
    params = sampling_params_of(temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_output_tokens,
                                json_schema=schema)
    return new_job("chat", req.model, params, req.stream, prefix=RESPONSE_PREFIX, messages=chat_messages(req, before),
                   caller=caller, tools=tools or None, tool_choice=choice,
                   parallel_tool_calls=req.parallel_tool_calls is not False)


def message_item(job: Job, text: str, status: str, index: int = 0) -> dict:
    """A message output item; its id names its place in the output (text may come again after a call)."""
    return {"type": "message", "id": f"msg_{job.id.removeprefix(RESPONSE_PREFIX)}_{index}", "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else []}


def call_item(call: ToolCall, status: str, arguments: str | None = None) -> dict:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.function.name, "arguments": call.function.arguments if arguments is None else arguments,
            "status": status}


def response_object(job: Job, done: Done | None, output: list[dict]) -> dict:
    """The Response: in progress (`done` None) or finished, echoing what was asked."""
    system = job.messages[0].content if job.messages and job.messages[0].role == "system" else None
    status = "in_progress" if done is None else "incomplete" if done.finish_reason == "length" else "completed"
    usage = None
    if done is not None:
        details = done.usage.prompt_tokens_details
        cached = details.cached_tokens if details else 0
        usage = {"input_tokens": done.usage.prompt_tokens,
                 "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                 "output_tokens": done.usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": done.usage.total_tokens}
    choice = job.tool_choice if isinstance(job.tool_choice, str) else {"type": "function",
                                                                       "name": job.tool_choice.function.name}
    return {
        "id": job.id, "object": "response", "created_at": int(job.created), "status": status, "model": job.model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": system, "max_output_tokens": job.params.max_tokens, "temperature": job.params.temperature,
        "top_p": job.params.top_p, "parallel_tool_calls": job.parallel_tool_calls, "tool_choice": choice,
        "tools": [{"type": "function", "name": t.function.name, "description": t.function.description,
                   "parameters": t.function.parameters, "strict": t.function.strict} for t in job.tools or []],
        "text": {"format": {"type": "json_schema", "name": "schema", "schema": job.params.json_schema}
                 if job.params.json_schema is not None else {"type": "text"}},
        "usage": usage, "metadata": {}, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "truncation": "disabled", "completed_at": int(time.time()) if done is not None else None,
    }


def response_body(job: Job, done: Done) -> dict:
    output = [message_item(job, done.text, "completed")] if done.text else []
    return response_object(job, done, output + [call_item(c, "completed") for c in done.tool_calls or []])


class ResponsesStream:
    """One streamed Response's events: a message item opened at text and closed before a call or at the end, each call
    an item of its own; the final Response's output is the items as they were streamed."""

    def __init__(self):
        self.sequence = 0
        self.output: list[dict] = []  # items done, in order
        self.text: str | None = None  # the open message item's text so far; None: none open

    def event(self, kind: str, /, **data) -> bytes:
        out = b"event: " + kind.encode() + b"\ndata: " + encode({"type": kind, "sequence_number": self.sequence,
                                                                   **data}) + b"\n\n"
        self.sequence += 1
        return out

    def close(self, job: Job) -> bytes:
        if self.text is None:
            return b""
        index = len(self.output)
        item, self.text = message_item(job, self.text, "completed", index), None
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return (self.event("response.output_text.done", **where, text=item["content"][0]["text"], logprobs=[])
                + self.event("response.content_part.done", **where, part=item["content"][0])
                + self.event("response.output_item.done", output_index=index, item=item))

    def chunk(self, job: Job, role: bool = False, text: str | None = None, call: tuple[int, ToolCall] | None = None,
              **_) -> bytes:
        if role:
            start = response_object(job, None, [])
            return self.event("response.created", response=start) + self.event("response.in_progress", response=start)
        if call is not None:
            out = self.close(job)
            index = len(self.output)
            item, done = call_item(call[1], "in_progress", arguments=""), call_item(call[1], "completed")
            self.output.append(done)
            return out + b"".join((
                self.event("response.output_item.added", output_index=index, item=item),
                self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                           delta=done["arguments"]),
                self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           name=done["name"], arguments=done["arguments"]),
                self.event("response.output_item.done", output_index=index, item=done)))
        if not text:
            return b""
        index, out = len(self.output), b""
        item = message_item(job, "", "in_progress", index)
        item_id = item["id"]
        if self.text is None:
            self.text = ""
            out = (self.event("response.output_item.added", output_index=index, item=item)
                   + self.event("response.content_part.added", item_id=item_id, output_index=index,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        self.text += text
        return out + self.event("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                                delta=text, logprobs=[])

    def finish(self, job: Job, done: Done, include_usage: bool) -> bytes:
        out = self.close(job)
        body = response_object(job, done, self.output)
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return out + self.event(kind, response=body)

    def error(self, status: int, detail: ErrorDetail) -> bytes:
        # OpenAI's SDK raises on an event whose data carries `error`.
        return self.event("error", code=detail.code, message=detail.message, param=detail.param,
                          error=msgspec.to_builtins(detail))


async def previous(js, response_id: str, caller: str) -> list[ChatMessage]:
    """The conversation a response continues: what response `response_id` was asked, and its answer. Only its own
    caller (the same API key) may continue it; to anyone else it does not exist."""
    missing = APIError(400, f"Previous response with id '{response_id[:100]}' not found.", "previous_response_id",
                       "previous_response_not_found")
    # Not asked of NATS unless it is an id this ingress makes: the id goes into a subject, and one of some kilobytes
    # would overrun NATS's limit on a command's length, which closes the connection every request shares.
    if not made_here(response_id, RESPONSE_PREFIX):
        raise missing
    try:
        msg = await js.get_last_msg(CONVERSATIONS_STREAM, conversation_subject(response_id), direct=True)
        asked = decode_conversation(msg.data)
        done = await stored_result(js, asked.model, INGRESS, response_id) if asked.caller == caller else None
    except NotFoundError:
        raise missing from None
    except (nats.errors.Error, msgspec.DecodeError) as exc:
        raise APIError(503, f"The stored responses could not be read ({type(exc).__name__}); retry.",
                       code="queue_unavailable") from None
    if not isinstance(done, Done):  # another caller's, failed, or not finished (yet)
        raise missing
    return [*asked.messages, ChatMessage(role="assistant", content=done.text or None, tool_calls=done.tool_calls)]


def keeper(js, limit: int, caller: str, instructions: bool):
    """What keeps an answered response's input for `previous_response_id` (its answer is its job's result). Best
    effort: a response that cannot be kept (NATS away, larger than a job may be) is answered all the same."""
    async def keep(job: Job, done: Done) -> None:
        # Without this request's instructions (OpenAI does not carry them over to the next response).
        asked = encode(Conversation(model=job.model, messages=job.messages[1:] if instructions else job.messages,
                                    caller=caller))
        if len(asked) > limit:
            log.warning("response %s is not kept for previous_response_id: %d bytes, more than %d", job.id,
                        len(asked), limit)
            return
        try:
            await js.publish(conversation_subject(job.id), asked, stream=CONVERSATIONS_STREAM)
        except nats.errors.Error as exc:
            log.warning("response %s is not kept for previous_response_id: %s", job.id, exc)
    return keep


async def responses(request: Request) -> Response:
    ingress = request.app.state.ingress
    limit = request_limit(ingress)
    req = await read_request(request, ResponsesRequest, limit)
    js = ingress.link.nc.jetstream()
    caller = request.state.caller
    before = await previous(js, req.previous_response_id, caller) if req.previous_response_id else []
    job = responses_job(req, caller, before)
    await model_for(ingress, req.model)
    stream = ResponsesStream()
    keep = keeper(js, limit, caller, bool(req.instructions)) if req.store is not False else None
    shape = Shape(stream.chunk, response_body, stream.finish, stream.error, b"", on_done=keep)
    return await respond(request, ingress, job, req.stream, False, shape)
