"""Generation on MLX with mlx-lm: prompt building, validation, sampling, stop rules, usage.

Everything here runs on the one thread that owns the model (on every rank of a group). `run_job` yields the events of
schemas/jobs.py; the worker process only moves them onto NATS.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from schemas.jobs import Accepted, Chunk, Done, Job, SamplingParams
from schemas.openai import ChatMessage, ErrorDetail, Usage
from workers.lockstep import broadcast_prompt, lockstep_generate
from workers.shard import Shard, load_shard
from workers.stops import StopMatcher
from workers.store import model_context_length, model_revision


class JobError(Exception):
    """A job that cannot run; carries the OpenAI error the requester gets."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)


@dataclass
class LoadedModel:
    model_id: str
    shard: Shard
    context_length: int
    revision: str  # workers/store.py: model_revision, recorded in the audit log


def open_model(model_id: str, model_dir: Path, layout: str = "whole", group: mx.distributed.Group | None = None,
               split: list[int] | None = None) -> LoadedModel:
    shard = load_shard(model_dir, layout, group, split)
    context = model_context_length(Path(model_dir)) or int(getattr(shard.tokenizer, "model_max_length", 4096))
    return LoadedModel(model_id, shard, context, model_revision(Path(model_dir)))


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)


def prompt_tokens(job: Job, tokenizer) -> list[int]:
    """The token ids the model sees: the chat template applied to the messages, or the raw prompt."""
    if job.kind == "chat":
        if not job.messages:
            raise JobError(400, "'messages' must be a non-empty array.", "messages", "missing_required_parameter")
        # Templates know system/user/assistant; OpenAI's newer "developer" role is a system message.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": message_text(m)}
            for m in job.messages
        ]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if isinstance(job.prompt, list):
        vocab = tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in job.prompt):
            raise JobError(400, f"Prompt token ids must be in [0, {vocab}).", "prompt", "invalid_value")
        return list(job.prompt)
    if job.prompt is None:
        raise JobError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    return list(tokenizer.encode(job.prompt))


RANGES = {  # OpenAI's ranges, and mlx-lm's for its own parameters
    "temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0), "repetition_penalty": (0.0, 10.0),
}


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Every job's sampling parameters, whoever submitted it (HTTP or NATS): the ranges the API promises,
    and what MLX itself would reject mid-generation (or crash on, for an out-of-range bias id)."""
    for name, (low, high) in RANGES.items():
        value = getattr(params, name)
        if not low <= value <= high:
            raise JobError(400, f"Invalid '{name}': expected a value between {low} and {high}, but got {value} "
                           f"instead.", name, "invalid_value")
    if any(not -100.0 <= bias <= 100.0 for bias in params.logit_bias.values()):
        raise JobError(400, "Invalid 'logit_bias': expected a value between -100.0 and 100.0 for every token.",
                       "logit_bias", "invalid_value")
    if params.seed is not None and not 0 <= params.seed < 2**64:
        raise JobError(400, f"Invalid 'seed': expected an integer in [0, 2**64), got {params.seed}.", "seed",
                       "invalid_value")
    if any(not 0 <= token < vocab_size for token in params.logit_bias):
        raise JobError(400, f"Invalid 'logit_bias': token ids must be in [0, {vocab_size}).", "logit_bias",
                       "invalid_value")


def check_limits(n_prompt: int, params: SamplingParams, context: int, param: str) -> int:
    """The number of tokens to generate, or a 400 if the request cannot fit the model's context."""
    if n_prompt == 0:
        raise JobError(400, "The prompt is empty.", param, "invalid_value")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise JobError(400, f"Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, "
                       f"but got {params.max_tokens} instead.", "max_tokens", "integer_below_min_value")
    if n_prompt >= context or (params.max_tokens is not None and n_prompt + params.max_tokens > context):
        asked = f" and {params.max_tokens} in the completion" if params.max_tokens is not None else ""
        raise JobError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{n_prompt + (params.max_tokens or 0)} tokens ({n_prompt} in the {param}{asked}). "
            f"Please reduce the length of the {param} or completion.",
            param,
            "context_length_exceeded",
        )
    return params.max_tokens if params.max_tokens is not None else context - n_prompt


def sampler_for(params: SamplingParams):
    # OpenAI's top_p=1 means "off"; mlx-lm spells off as 0.
    top_p = params.top_p if 0.0 < params.top_p < 1.0 else 0.0
    sampler = make_sampler(temp=params.temperature, top_p=top_p, min_p=params.min_p, top_k=params.top_k)
    processors = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )
    return sampler, processors


def chooser(params: SamplingParams):
    """The leader's sampler for one job: logits processors, then mlx-lm's sampler, as `generate_step` does."""
    sampler, processors = sampler_for(params)

    def choose(logits: mx.array, history: mx.array) -> mx.array:
        for processor in processors:
            logits = processor(history, logits)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return choose


def run_job(loaded: LoadedModel, job: Job, worker: str, attempt: int = 1,
            cancelled: threading.Event | None = None) -> Iterator[Accepted | Chunk | Done]:
    """Generate for one job (on the leader of a group: its followers run `follow_job`).

    Raises JobError for a job that cannot run. Everything that can refuse a job happens before the
    prompt goes to the followers; they get an empty prompt instead, so the group stays in step.
    """
    start = time.perf_counter()
    shard = loaded.shard
    try:
        tokens = prompt_tokens(job, shard.tokenizer)
        max_tokens = check_limits(len(tokens), job.params, loaded.context_length,
                                  "messages" if job.kind == "chat" else "prompt")
        check_params(job.params, shard.vocab_size)
        choose = chooser(job.params)
        if job.params.seed is not None:
            mx.random.seed(job.params.seed)
    except JobError:
        broadcast_prompt(shard, [])
        raise
    except Exception as exc:  # a bug, not the requester's fault; the group is still in step
        broadcast_prompt(shard, [])
        raise JobError(500, f"The worker could not start the job: {type(exc).__name__}: {exc}", None,
                       "worker_error", "server_error") from exc
    broadcast_prompt(shard, tokens)
    yield Accepted(id=job.id, prompt_tokens=len(tokens), worker=worker, attempt=attempt)

    tokenizer = shard.tokenizer
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stops = StopMatcher(job.params.stop)
    text_parts: list[str] = []
    ttft_ms = 0.0
    finish = "length"
    generated = 0
    index = 0
    steps = lockstep_generate(shard, tokens, choose)
    for token in steps:
        generated += 1
        if generated == 1:
            ttft_ms = (time.perf_counter() - start) * 1000
        eos = token in tokenizer.eos_token_ids
        end = eos or generated == max_tokens
        if eos:
            finish = "stop"
        else:
            detokenizer.add_token(token)
        if end:
            detokenizer.finalize()
        text, stopped = stops.feed(detokenizer.last_segment)
        if stopped:
            finish = "stop"
        elif end:
            text += stops.flush()
        if text:
            text_parts.append(text)
            yield Chunk(id=job.id, index=index, text=text, tokens=generated)
            index += 1
        if end or stopped or (cancelled is not None and cancelled.is_set()):
            break
    steps.close()
    yield Done(
        id=job.id,
        text="".join(text_parts),
        finish_reason=finish,
        usage=Usage(prompt_tokens=len(tokens), completion_tokens=generated, total_tokens=len(tokens) + generated),
        ttft_ms=ttft_ms,
        duration_ms=(time.perf_counter() - start) * 1000,
        worker=worker,
    )


def follow_job(shard: Shard) -> None:
    """A follower's side of one job: take the leader's prompt, then step with the group until it stops."""
    prompt = broadcast_prompt(shard, None)
    if prompt:
        for _ in lockstep_generate(shard, prompt):
            pass
