"""Internal messages: the job a submitter puts on JetStream and the events a worker sends back.

Non-Python submitters publish the same JSON; `conclave schemas` writes these types as JSON Schema.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec
from msgspec import Struct

from schemas.openai import ChatMessage, ErrorDetail, NamedToolChoice, TokenLogprob, Tool, ToolCall, Usage


MAX_TOP_LOGPROBS = 20  # alternatives listed at each token, at most (OpenAI's top_logprobs)
MAX_CHOICES = 16  # answers to one request (`n`), each a row of the batch


class SamplingParams(Struct, forbid_unknown_fields=True):
    temperature: float = 1.0  # OpenAI's default; 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: Union[int, None] = None
    max_tokens: Union[int, None] = None  # None: up to the model's context length
    stop: list[str] = msgspec.field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    # None: no log probabilities; n: each generated token's, with the n most likely tokens at its place (0 to 20),
    # from the distribution the sampler drew from (after logit_bias and penalties, before temperature and filters)
    logprobs: Union[int, None] = None
    # The answer must be JSON matching this JSON Schema (response_format; {"type": "object"} for json_object):
    # decoding is constrained to it (workers/constrain.py). A schema the engine cannot honour is a 400 naming why.
    json_schema: Union[dict[str, Any], None] = None
    # Answers to generate (OpenAI's `n`, 1 to MAX_CHOICES): one row each, sharing the prompt's prefill; choice i draws
    # from seed + i when a seed is given.
    n: int = 1


class Job(Struct, forbid_unknown_fields=True):
    """One generation request. Published by submitter S on `conclave.jobs.<model>.S` with `Nats-Msg-Id` = `id`;
    `reply_subject` must lie under `conclave.replies.S.` (pipeline/access.py, pipeline/intake.py)."""

    id: str
    model: str
    reply_subject: str
    kind: Literal["chat", "completion"]
    messages: Union[list[ChatMessage], None] = None  # kind == "chat"
    # kind == "chat": functions the model may call (workers/tools.py). "auto": it decides; "none": it is not shown
    # them; "required" or a named function: its answer is constrained to be calls (to that one) matching the schemas.
    tools: Union[list[Tool], None] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice] = "auto"
    parallel_tool_calls: bool = True  # False: at most one call per answer
    prompt: Union[str, list[int], None] = None  # kind == "completion": text or token ids
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = True  # False: only the final Done (or Failed) is sent
    created: float = 0.0  # unix seconds, set by the submitter; used for the queue TTL
    source: str = "nats"  # "http" for the ingress
    # Who asked, for the audit log: believed from the ingress (the API key's name) and the operator; from any
    # other submitter it is recorded as its claim, next to its authenticated name (schemas/audit.py).
    caller: str = ""


class ReplyAddress(Struct):
    """Read from a job that fails to decode, to know where its schema error goes."""

    reply_subject: Union[str, None] = None
    id: Union[str, None] = None


class Cancel(Struct, forbid_unknown_fields=True):
    """Published on `conclave.cancels.<submitter>.<job id>`: stop (or never start) that job."""

    id: str
    reason: str = ""
    # The submitter already answered its client with an error (503 queue_unavailable) while it could not
    # tell whether the job was queued: if it was, it is settled with that error and never run.
    refused: bool = False


class Accepted(Struct, tag="accepted"):
    """The worker took the job and validated it; generation starts now."""

    id: str
    prompt_tokens: int
    worker: str
    attempt: int = 1


class Chunk(Struct, tag="chunk"):
    id: str
    index: int  # 0, 1, 2... (per choice) lets a consumer detect a gap or a restart
    text: str
    tokens: int  # completion tokens generated so far
    attempt: int = 1  # the delivery that produced it: a later attempt's Accepted supersedes it
    logprobs: list[TokenLogprob] = []  # with params.logprobs: the tokens whose text this chunk brings
    tool_calls: list[ToolCall] = []  # calls completed with this chunk, in the order made (each whole: workers/tools.py)
    choice: int = 0  # which of the job's `n` answers it belongs to


class Heartbeat(Struct, tag="heartbeat"):
    """Sent while a job is in progress (prefill can be long) so the requester can tell a live worker from a dead one."""

    id: str
    tokens: int
    attempt: int = 1


class Choice(Struct):
    """One answer of a job asked for several (`n`): what Done carries for its first."""

    index: int
    text: str
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: Union[list[TokenLogprob], None] = None
    tool_calls: Union[list[ToolCall], None] = None


class Done(Struct, tag="done"):
    id: str
    text: str
    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage
    ttft_ms: float
    duration_ms: float
    worker: str
    attempt: int = 1
    # With params.logprobs, for a job not streamed: every token of `text` (a streamed job had them in its chunks).
    logprobs: Union[list[TokenLogprob], None] = None
    tool_calls: Union[list[ToolCall], None] = None  # the calls the answer made (`text` is the rest of it)
    # With params.n > 1: the other answers (choice 1 on; the fields above are choice 0's). `usage` counts them all.
    choices: list[Choice] = []
    stop_sequence: Union[str, None] = None  # the stop sequence that ended the (first) answer, if one did


class Failed(Struct, tag="failed"):
    id: str
    status: int  # the HTTP status the ingress answers with
    error: ErrorDetail
    attempt: int = 1


class Requeued(Struct, tag="requeued"):
    """The worker group running the job lost a rank (a node gone): the job is back in the queue, unsettled, and
    the next group (re-placed elsewhere) runs it again; until one takes it, the requester waits as for a queued job."""

    id: str
    reason: str
    attempt: int = 1


Event = Union[Accepted, Chunk, Heartbeat, Done, Failed, Requeued]


class WorkerStatus(Struct):
    """Published by every worker every few seconds on `conclave.status.<model>`."""

    worker: str
    model: str
    pid: int
    host: str
    state: Literal["loading", "ready", "busy", "stopping"]
    context_length: int = 0
    jobs_done: int = 0
    layout: Literal["whole", "tensor", "pipeline"] = "whole"
    ranks: int = 1
    active: int = 0  # jobs taken and not yet settled: in the batch, about to join it, or being checked
    max_batch: int = 0  # jobs it generates at once
    # Moving averages over its recent jobs, for admission control (ingress/admission.py): how long a job
    # holds a batch slot, and how long its prefill holds the batch's single joining slot. 0: no job yet.
    job_s: float = 0.0
    prefill_s: float = 0.0
    # Why it cannot settle jobs right now (its audit records are refused): it acks nothing meanwhile, and
    # the ingress's /health reports it. Empty when all is well.
    problem: str = ""
    # Tokens its batch stepped through since it started (workers/status.py: Progress): the dashboard's tokens per
    # second of the model are the growth of its workers' sums (ingress/live.py).
    tokens: int = 0
    ttft_s: float = 0.0  # moving average of its jobs' time to first token (0: no job yet)
