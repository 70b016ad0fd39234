"""The two completion endpoints' answers: OpenAI's SSE chunks and JSON bodies for a job's events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import msgspec

from schemas.jobs import Done, Job
from schemas.openai import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta,
                            Completion, CompletionChoice, Usage)

encode = msgspec.json.Encoder().encode


def sse(message: msgspec.Struct) -> bytes:
    return b"data: " + encode(message) + b"\n\n"


def chat_chunk(job: Job, role: bool = False, text: str | None = None, finish: str | None = None,
               usage: Usage | None = None) -> bytes:
    choices = [] if usage else [ChunkChoice(index=0, delta=ChunkDelta(
        role="assistant" if role else None, content="" if role else text), finish_reason=finish)]
    return sse(ChatCompletionChunk(id=job.id, created=int(job.created), model=job.model, choices=choices, usage=usage))


def chat_body(job: Job, done: Done) -> ChatCompletion:
    return ChatCompletion(id=job.id, created=int(job.created), model=job.model, usage=done.usage, choices=[
        ChatChoice(index=0, message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)])


def completion_chunk(job: Job, role: bool = False, text: str | None = None, finish: str | None = None,
                     usage: Usage | None = None) -> bytes:
    if role:
        return b""  # completion streams have no role chunk
    choices = [] if usage else [CompletionChoice(index=0, text=text or "", finish_reason=finish)]
    return sse(Completion(id=job.id, created=int(job.created), model=job.model, choices=choices, usage=usage))


def completion_body(job: Job, done: Done) -> Completion:
    return Completion(id=job.id, created=int(job.created), model=job.model, usage=done.usage, choices=[
        CompletionChoice(index=0, text=done.text, finish_reason=done.finish_reason)])


@dataclass(frozen=True)
class Shape:
    """How one endpoint writes a job's answer."""

    chunk: Callable[..., bytes]  # (job, role=, text=, finish=, usage=) -> one SSE event
    body: Callable[[Job, Done], msgspec.Struct]  # the whole answer, not streamed


CHAT = Shape(chat_chunk, chat_body)
COMPLETION = Shape(completion_chunk, completion_body)
