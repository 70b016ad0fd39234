"""`POST /v1/messages`: Anthropic's Messages API, a thin translation onto the same chat jobs as OpenAI's, so that
tools built on the `anthropic` SDK work against a local model.

In: `system` is the first message; text blocks are the message's text; an assistant's `tool_use` blocks are its
tool calls and a user's `tool_result` blocks are `tool` messages (workers/tools.py renders both); `tools` and
`tool_choice` map onto OpenAI's (`any` is `required`, `tool` a named function, `disable_parallel_tool_use` is
`parallel_tool_calls: false`). Out: a Message with text and `tool_use` blocks, Anthropic's stop reasons, and, when
streamed, its named events (`message_start`, `content_block_start`/`_delta`/`_stop`, `message_delta`,
`message_stop`, `error`). Errors are Anthropic's object, `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ingress.errors import APIError
from ingress.handlers import model_for, request_limit
from ingress.reading import read_request
from ingress.requests import new_job, sampling_params_of
from ingress.respond import respond
from ingress.shapes import Shape
from schemas.anthropic import (AnthropicError, AnthropicErrorDetail, ImageBlock, MessagesRequest, MessagesUsage,
                               Message, TextBlock, TextOut, ToolResultBlock, ToolUseBlock, ToolUseOut)
from schemas.jobs import Done, Job
from schemas.openai import (ChatMessage, ErrorDetail, FunctionCall, FunctionDefinition, FunctionName,
                            NamedToolChoice, TextPart, Tool, ToolCall)

encode = msgspec.json.Encoder().encode
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# Anthropic's error types by HTTP status (its API reference, "Errors").
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}


def error_of(status: int, detail: ErrorDetail) -> AnthropicError:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return AnthropicError(error=AnthropicErrorDetail(type=kind, message=detail.message))


def error_response(status: int, detail: ErrorDetail, headers: dict | None = None) -> Response:
    return Response(encode(error_of(status, detail)), status_code=status, media_type="application/json",
                    headers=headers)


def event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + encode({"type": name, **data}) + b"\n\n"


def text_of(content: str | list[TextBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(block.text for block in content)


def chat_messages(req: MessagesRequest) -> list[ChatMessage]:
    messages = [ChatMessage(role="system", content=text_of(req.system))] if req.system else []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, str):
            messages.append(ChatMessage(role=message.role, content=message.content))
            continue
        parts, calls = [], []
        for j, block in enumerate(message.content):
            if isinstance(block, ImageBlock):
                raise APIError(400, f"messages.{i}.content.{j}: this model reads text only; image blocks are not "
                               f"supported.", f"messages.{i}.content.{j}", "unsupported_value")
            if isinstance(block, TextBlock):
                parts.append(TextPart(type="text", text=block.text))
            elif isinstance(block, ToolUseBlock):
                calls.append(ToolCall(id=block.id, function=FunctionCall(name=block.name,
                                                                         arguments=json.dumps(block.input))))
            elif isinstance(block, ToolResultBlock):
                result = text_of(block.content)
                messages.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                            content=f"Error: {result}" if block.is_error else result))
        if parts or calls:
            messages.append(ChatMessage(role=message.role, content=parts or None, tool_calls=calls or None))
    return messages


def messages_job(req: MessagesRequest, caller: str) -> Job:
    if req.thinking is not None and req.thinking.get("type") != "disabled":  # as Anthropic answers for such a model
        raise APIError(400, "thinking: this model does not support extended thinking.", "thinking")
    if req.output_config is not None and req.output_config.effort is not None:
        raise APIError(400, "output_config.effort: this model does not support effort.", "output_config.effort")
    if req.temperature is not None and not 0 <= req.temperature <= 1:
        raise APIError(400, f"temperature: range: 0..1 (got {req.temperature})", "temperature")
    if not req.messages:
        raise APIError(400, "messages: at least one message is required", "messages")
    tools = [Tool(type="function", function=FunctionDefinition(name=t.name, description=t.description,
                                                               parameters=t.input_schema)) for t in req.tools or []]
    choice, parallel = "auto", True
    if req.tool_choice is not None:
        kind, parallel = req.tool_choice.type, not req.tool_choice.disable_parallel_tool_use
        if kind == "tool":
            if not req.tool_choice.name:
                raise APIError(400, "tool_choice.name: Field required", "tool_choice.name")
            choice = NamedToolChoice(type="function", function=FunctionName(name=req.tool_choice.name))
        else:
            choice = {"any": "required"}.get(kind, kind)
    params = sampling_params_of(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                max_tokens=req.max_tokens, stop=req.stop_sequences or [],
                                json_schema=req.output_config.format.schema if req.output_config and
                                req.output_config.format else None)
    return new_job("chat", req.model, params, req.stream, prefix="msg_", messages=chat_messages(req), caller=caller,
                   tools=tools or None, tool_choice=choice, parallel_tool_calls=parallel)


def tool_use(call: ToolCall) -> ToolUseOut:
    """A call as a tool_use block, whose `input` is always an object (the SDK and this API insist): an unconstrained
    call's arguments that are not a JSON object are passed on whole as {"arguments": <their text>}."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        arguments = {"arguments": call.function.arguments}
    return ToolUseOut(id=call.id.replace("call_", "toolu_", 1), name=call.function.name, input=arguments)


def usage_of(done: Done) -> MessagesUsage:
    details = done.usage.prompt_tokens_details
    return MessagesUsage(input_tokens=done.usage.prompt_tokens, output_tokens=done.usage.completion_tokens,
                         cache_read_input_tokens=details.cached_tokens if details else 0)


def message_body(job: Job, done: Done) -> Message:
    content = ([TextOut(text=done.text)] if done.text else []) + [tool_use(c) for c in done.tool_calls or []]
    return Message(id=job.id, model=job.model, content=content, stop_reason=stop_reason(done),
                   stop_sequence=done.stop_sequence, usage=usage_of(done))


def stop_reason(done: Done) -> str:
    if done.tool_calls and done.finish_reason != "length":  # a named tool_choice is "stop" in OpenAI's terms only
        return "tool_use"
    return "stop_sequence" if done.stop_sequence is not None else STOP_REASONS[done.finish_reason]


class MessagesStream:
    """One streamed answer's events: content blocks are opened and closed as text and tool calls arrive."""

    def __init__(self):
        self.blocks = 0  # blocks started
        self.open = False  # a text block is open

    def close(self) -> bytes:
        if not self.open:
            return b""
        self.open = False
        return event("content_block_stop", {"index": self.blocks - 1})

    def chunk(self, job: Job, role: bool = False, text: str | None = None, call: tuple[int, ToolCall] | None = None,
              **_) -> bytes:
        if role:
            return event("message_start", {"message": {
                "id": job.id, "type": "message", "role": "assistant", "model": job.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})
        if call is not None:
            use = tool_use(call[1])
            out = self.close() + event("content_block_start", {"index": self.blocks, "content_block": {
                "type": "tool_use", "id": use.id, "name": use.name, "input": {}}})
            out += event("content_block_delta", {"index": self.blocks, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(use.input)}})
            out += event("content_block_stop", {"index": self.blocks})
            self.blocks += 1
            return out
        if not text:
            return b""
        out = b""
        if not self.open:
            out = event("content_block_start", {"index": self.blocks, "content_block": {"type": "text", "text": ""}})
            self.open, self.blocks = True, self.blocks + 1
        return out + event("content_block_delta", {"index": self.blocks - 1, "delta": {"type": "text_delta",
                                                                                       "text": text}})

    def finish(self, job: Job, done: Done, include_usage: bool) -> bytes:
        usage = usage_of(done)
        return self.close() + event("message_delta", {
            "delta": {"stop_reason": stop_reason(done), "stop_sequence": done.stop_sequence},
            "usage": {"output_tokens": usage.output_tokens, "input_tokens": usage.input_tokens,
                      "cache_read_input_tokens": usage.cache_read_input_tokens}}) + event("message_stop", {})


def stream_error(status: int, detail: ErrorDetail) -> bytes:
    return b"event: error\ndata: " + encode(error_of(status, detail)) + b"\n\n"


async def messages(request: Request) -> Response:
    ingress = request.app.state.ingress
    req = await read_request(request, MessagesRequest, request_limit(ingress))
    job = messages_job(req, request.state.caller)
    await model_for(ingress, req.model)
    stream = MessagesStream()
    shape = Shape(stream.chunk, message_body, stream.finish, stream_error, b"")
    return await respond(request, ingress, job, req.stream, False, shape)
