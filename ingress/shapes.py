"""The two completion endpoints' answers: OpenAI's SSE chunks and JSON bodies for a job's events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

import msgspec

from schemas.jobs import Choice, Done, Job
from schemas.openai import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs, ChunkChoice,
                            ChunkDelta, Completion, CompletionChoice, CompletionLogprobs, ErrorDetail, ErrorResponse,
                            FunctionDelta, TokenLogprob, ToolCall, ToolCallDelta, Usage)

encode = msgspec.json.Encoder().encode


def sse(message: msgspec.Struct) -> bytes:
    return b"data: " + encode(message) + b"\n\n"


def choices_of(done: Done) -> list[Choice]:
    """Every answer of a job (`n`): the first is Done's own fields."""
    return [Choice(index=0, text=done.text, finish_reason=done.finish_reason, logprobs=done.logprobs,
                   tool_calls=done.tool_calls), *done.choices]


def chat_chunk(job: Job, role: bool = False, text: str | None = None, finish: str | None = None,
               usage: Usage | None = None, logprobs: list[TokenLogprob] | None = None, offset: int = 0,
               call: tuple[int, ToolCall] | None = None, choice: int = 0) -> bytes:
    """One SSE event of answer `choice`; with `call` (its index in the answer, the call), two: as OpenAI streams a
    call, its id and name first, then its arguments."""
    if call is not None:
        index, tool_call = call
        return b"".join(sse(ChatCompletionChunk(id=job.id, created=int(job.created), model=job.model, choices=[
            ChunkChoice(index=choice, delta=ChunkDelta(tool_calls=[delta]))])) for delta in (
            ToolCallDelta(index=index, id=tool_call.id, type="function",
                          function=FunctionDelta(name=tool_call.function.name, arguments="")),
            ToolCallDelta(index=index, function=FunctionDelta(arguments=tool_call.function.arguments))))
    choices = [] if usage else [ChunkChoice(index=choice, delta=ChunkDelta(
        role="assistant" if role else None, content="" if role else text), finish_reason=finish,
        logprobs=ChatLogprobs(content=logprobs) if logprobs is not None else None)]
    return sse(ChatCompletionChunk(id=job.id, created=int(job.created), model=job.model, choices=choices, usage=usage))


def chat_body(job: Job, done: Done) -> ChatCompletion:
    return ChatCompletion(id=job.id, created=int(job.created), model=job.model, usage=done.usage, choices=[
        ChatChoice(index=c.index, finish_reason=c.finish_reason,
                   message=AssistantMessage(role="assistant", content=c.text or None if c.tool_calls else c.text,
                                            tool_calls=c.tool_calls),
                   logprobs=ChatLogprobs(content=c.logprobs) if c.logprobs is not None else None)
        for c in choices_of(done)])


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs | None:
    """The legacy shape of `entries`, whose text starts `offset` characters into the answer."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
                              text_offset=offsets)


def completion_chunk(job: Job, role: bool = False, text: str | None = None, finish: str | None = None,
                     usage: Usage | None = None, logprobs: list[TokenLogprob] | None = None, offset: int = 0,
                     choice: int = 0) -> bytes:
    if role:
        return b""  # completion streams have no role chunk
    choices = [] if usage else [CompletionChoice(index=choice, text=text or "", finish_reason=finish,
                                                 logprobs=completion_logprobs(logprobs, offset))]
    return sse(Completion(id=job.id, created=int(job.created), model=job.model, choices=choices, usage=usage))


def completion_body(job: Job, done: Done) -> Completion:
    return Completion(id=job.id, created=int(job.created), model=job.model, usage=done.usage, choices=[
        CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                         logprobs=completion_logprobs(c.logprobs, prompt_chars(job))) for c in choices_of(done)])


def prompt_chars(job: Job) -> int:
    """Where the answer starts in `text_offset`'s count, which includes the prompt (OpenAI's: prompt "test" gives
    its first token offset 4); a prompt of token ids counts 0."""
    return len(job.prompt) if isinstance(job.prompt, str) else 0


def openai_finish(chunk: Callable[..., bytes]) -> Callable[[Job, Done, bool], bytes]:
    """The end of an OpenAI stream: each answer's finish chunk, then the usage chunk if asked for."""
    def finish(job: Job, done: Done, include_usage: bool) -> bytes:
        ends = b"".join(chunk(job, finish=c.finish_reason, choice=c.index) for c in choices_of(done))
        return ends + (chunk(job, usage=done.usage) if include_usage else b"")
    return finish


def openai_error(status: int, detail: ErrorDetail) -> bytes:
    return b"data: " + encode(ErrorResponse(error=detail)) + b"\n\n"  # OpenAI's SDKs raise on it


@dataclass(frozen=True)
class Shape:
    """How one endpoint writes a job's answer: streamed (`chunk` as events arrive, `finish` with the final one, `error`
    for a failure after the stream started, `end` last) or whole (`body`)."""

    chunk: Callable[..., bytes]  # (job, role=, text=, logprobs=, offset=, call=, choice=) -> SSE events
    body: Callable[[Job, Done], msgspec.Struct]
    finish: Callable[[Job, Done, bool], bytes]  # (job, done, include_usage)
    error: Callable[[int, ErrorDetail], bytes] = openai_error
    end: bytes = b"data: [DONE]\n\n"
    on_done: Callable[[Job, Done], Awaitable[None]] | None = None  # once answered (the Responses API keeps its input)


CHAT = Shape(chat_chunk, chat_body, openai_finish(chat_chunk))
COMPLETION = Shape(completion_chunk, completion_body, openai_finish(completion_chunk))
