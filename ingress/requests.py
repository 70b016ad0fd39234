"""OpenAI requests -> internal jobs: the checks that need no model, and the parameter mapping."""

from __future__ import annotations

import re
import time
import uuid

from ingress.errors import APIError
from pipeline.access import INGRESS
from pipeline.subjects import reply_subject
from schemas.jobs import MAX_CHOICES, MAX_TOP_LOGPROBS, Job, SamplingParams
from schemas.openai import ChatCompletionRequest, CompletionRequest, ResponseFormat, SamplingFields


TOKEN_ID = re.compile(r"-?[0-9]{1,12}")
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions


def _unsupported(name: str, given: bool, why: str = "") -> None:
    # An explicit 400 rather than silently ignoring a feature the client relies on.
    if given:
        raise APIError(400, f"'{name}' is not supported by this server{why}.", name, "unsupported_parameter")


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    json_schema: dict | None = None) -> SamplingParams:
    # Ranges are checked by the worker (workers/prepare.py: check_params), for NATS submitters too; `n` here as well,
    # since a stream that starts before a worker took the job writes a first chunk per answer.
    if not 1 <= req.n <= MAX_CHOICES:
        raise APIError(400, f"Invalid 'n': expected a value between 1 and {MAX_CHOICES}, but got {req.n} instead.",
                       "n", "invalid_value")
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        if not TOKEN_ID.fullmatch(key):  # str.isdigit() accepts "²", which int() refuses
            raise APIError(400, f"Invalid 'logit_bias': keys must be token ids (integers), got {key!r}.",
                           "logit_bias", "invalid_value")
        bias[int(key)] = value
    return sampling_params_of(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        max_tokens=max_tokens, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=bias, logprobs=logprobs, json_schema=json_schema,
        n=req.n)


def sampling_params_of(*, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       min_p: float | None = None, presence_penalty: float | None = None,
                       frequency_penalty: float | None = None, repetition_penalty: float | None = None,
                       **given) -> SamplingParams:
    """A job's parameters from an API's fields, `None` meaning not given (each API's own defaults are OpenAI's)."""
    # max_tokens < 1 is refused by the worker (workers/prepare.py: check_limits), for NATS submitters too.
    return SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,  # 0 and vLLM's -1 mean off
        min_p=min_p or 0.0,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        **given)


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """Chat's `logprobs` (a boolean) and `top_logprobs` (0 to 20 alternatives, only with it) as the job's number."""
    if isinstance(req.logprobs, int) and not isinstance(req.logprobs, bool):
        raise APIError(400, "Invalid type for 'logprobs': expected a boolean, but got an integer instead.",
                       "logprobs", "invalid_type")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
                           "'top_logprobs' is given.", "top_logprobs", "invalid_value")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"Invalid 'top_logprobs': expected a value between 0 and {MAX_TOP_LOGPROBS}, but "
                           f"got {req.top_logprobs} instead.", "top_logprobs", "invalid_value")
    return (req.top_logprobs or 0) if req.logprobs else None


def json_schema_of(response_format: ResponseFormat | None) -> dict | None:
    """The JSON Schema the answer must match: json_object is any object; json_schema's own (the worker compiles it
    and answers 400 for what it cannot honour, NATS jobs alike)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.json_schema is None:
        raise APIError(400, "Missing required parameter: 'response_format.json_schema'.", "response_format.json_schema",
                       "missing_required_parameter")
    return response_format.json_schema.schema or {"type": "object"}


def completion_logprobs(req: CompletionRequest) -> int | None:
    """Completions' `logprobs`: how many alternatives to list at each token, 0 to 5 (OpenAI's limit there)."""
    if req.logprobs is None:
        return None
    if isinstance(req.logprobs, bool):
        raise APIError(400, "Invalid type for 'logprobs': expected an integer, but got a boolean instead.",
                       "logprobs", "invalid_type")
    if not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise APIError(400, f"Invalid 'logprobs': expected a value between 0 and {MAX_COMPLETION_LOGPROBS}, but got "
                       f"{req.logprobs} instead.", "logprobs", "invalid_value")
    return req.logprobs


def made_here(job_id: str, prefix: str) -> bool:
    """Whether `job_id` is one `new_job` makes with `prefix`: the prefix and a UUID's 32 hex digits."""
    rest = job_id.removeprefix(prefix)
    return job_id.startswith(prefix) and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)


def new_job(kind: str, model: str, params: SamplingParams, stream: bool, prefix: str | None = None, **fields) -> Job:
    """A job with a fresh id: OpenAI's `chatcmpl-`/`cmpl-` ids, or another API's `prefix` (Anthropic's `msg_`)."""
    job_id = (prefix or ("chatcmpl-" if kind == "chat" else "cmpl-")) + uuid.uuid4().hex  # (see `made_here`)
    return Job(id=job_id, model=model, reply_subject=reply_subject(INGRESS, job_id), kind=kind, params=params,
               stream=stream, created=time.time(), source="http", **fields)


def chat_job(req: ChatCompletionRequest, caller: str) -> Job:
    if not req.messages:
        raise APIError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                       "messages", "empty_array")
    if req.modalities is not None and set(req.modalities) - {"text"}:
        raise APIError(400, f"Invalid 'modalities': this model writes text only, got {req.modalities}.", "modalities",
                       "unsupported_value")
    if req.reasoning_effort is not None:  # as OpenAI answers for a model without reasoning
        raise APIError(400, "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                       "reasoning_effort", "unsupported_parameter")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens, chat_logprobs(req), json_schema_of(req.response_format))
    # tools and tool_choice are checked by the worker (workers/tools.py: check_tools), for NATS submitters too.
    return new_job("chat", req.model, params, req.stream, messages=req.messages, caller=caller, tools=req.tools,
                   tool_choice=req.tool_choice or "auto",
                   parallel_tool_calls=req.parallel_tool_calls is not False)


def completion_job(req: CompletionRequest, caller: str) -> Job:
    _unsupported("echo", req.echo)
    _unsupported("suffix", bool(req.suffix))
    _unsupported("best_of", req.best_of not in (None, 1))
    prompt = req.prompt
    if isinstance(prompt, list) and any(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, "Only one prompt per request is supported (a string, a list of token ids, or a "
                           "list of one string).", "prompt", "unsupported_value")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "Invalid 'prompt': the prompt is empty.", "prompt", "invalid_value")
    return new_job("completion", req.model, sampling_params(req, req.max_tokens, completion_logprobs(req)), req.stream,
                   prompt=prompt,
                   caller=caller)
