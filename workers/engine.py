"""Generation on MLX with mlx-lm: prompt building, validation, sampling, stop rules, usage.

`prepare` validates a job (any thread); a `Generation` is that job in the batch of workers/lockstep.py,
on the thread that owns the model, emitting the events of schemas/jobs.py; the worker process only
moves them onto NATS.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from schemas.jobs import Chunk, Done, Job, SamplingParams
from schemas.openai import ChatMessage, ErrorDetail, PromptTokensDetails, Usage
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


def processor_arguments(params: SamplingParams) -> dict:
    """mlx-lm's `make_logits_processors` arguments for these parameters; None turns one off."""
    return {
        "logit_bias": params.logit_bias or None,
        "repetition_penalty": params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        "presence_penalty": params.presence_penalty or None,
        "frequency_penalty": params.frequency_penalty or None,
    }


def has_processors(params: SamplingParams) -> bool:
    """Whether `sampling_parts` makes logits processors (without making them: they hold MLX arrays)."""
    return any(value is not None for value in processor_arguments(params).values())


def sampling_parts(params: SamplingParams) -> tuple[list, list]:
    """mlx-lm's logits processors and logit filters for these parameters (the sampling itself is ours:
    it draws from the request's own random key, see `chooser`)."""
    processors = make_logits_processors(**processor_arguments(params))
    filters = []
    if 0.0 < params.top_p < 1.0:  # OpenAI's top_p=1 means "off"
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k:
        filters.append(lambda x: apply_top_k(x, params.top_k))
    return processors, filters


def chooser(params: SamplingParams, prompt: list[int]) -> Callable[[mx.array], mx.array]:
    """One request's sampler, as mlx-lm's `generate_step` samples: logits processors (which see the
    tokens so far), log-softmax, filters, then argmax or a draw at the temperature.

    The draw uses a random key of the request's own, from its `seed` (or a random one): MLX's global
    generator is shared by every request in the batch, so a seeded request would otherwise depend on
    what else was running.
    """
    processors, filters = sampling_parts(params)
    history = mx.array(prompt, dtype=mx.int32)
    key = mx.random.key(params.seed if params.seed is not None else secrets.randbits(64))

    def choose(logits: mx.array) -> mx.array:
        nonlocal history, key
        for processor in processors:
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if params.temperature == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            for method in filters:
                logprobs = method(logprobs)
            key, draw = mx.random.split(key)
            token = mx.random.categorical(logprobs * (1 / params.temperature), key=draw)
        token = token.astype(mx.int32).reshape(1)
        if processors:
            history = mx.concatenate([history, token])
        return token

    return choose


def prepare(loaded: LoadedModel, job: Job) -> tuple[list[int], int]:
    """The job's prompt ids and how many tokens it may generate; JobError if it cannot run."""
    tokens = prompt_tokens(job, loaded.shard.tokenizer)
    max_tokens = check_limits(len(tokens), job.params, loaded.context_length,
                              "messages" if job.kind == "chat" else "prompt")
    check_params(job.params, loaded.shard.vocab_size)
    return tokens, max_tokens


class Halted:
    """Marks a job dropped from the batch because the worker is stopping (it goes back to the queue)."""


class Generation:
    """One job in the batch, on the leader (the `Row` of workers/lockstep.py): its sampler, its
    detokeniser and stop rules, and its events, handed to `emit` (called on the model's thread)."""

    def __init__(self, job: Job, prompt: list[int], max_tokens: int, tokenizer, worker: str, emit: Callable,
                 cancelled: threading.Event, start: float):
        self.job = job
        self.eos = tokenizer.eos_token_ids
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.worker = worker
        self.emit = emit
        self.cancelled = cancelled
        self.start = start
        self.greedy = job.params.temperature == 0 and not has_processors(job.params)
        self.cached_tokens = 0  # set by the batch when the job joins it
        self._choose = None  # built on the model's thread, at the first step
        self.detokenizer = tokenizer.detokenizer  # a fresh copy per access
        self.stops = StopMatcher(job.params.stop)
        self.text_parts: list[str] = []
        self.generated = 0
        self.index = 0
        self.ttft_ms = 0.0
        self.finish = "length"

    def choose(self, logits: mx.array) -> mx.array:
        if self._choose is None:
            self._choose = chooser(self.job.params, self.prompt)
        return self._choose(logits)

    def on_token(self, token: int) -> bool:
        """Take the next generated token; True when the job is finished (its Done is emitted)."""
        self.generated += 1
        if self.generated == 1:
            self.ttft_ms = (time.perf_counter() - self.start) * 1000
        eos = token in self.eos
        end = eos or self.generated == self.max_tokens
        if eos:
            self.finish = "stop"
        else:
            self.detokenizer.add_token(token)
        if end:
            self.detokenizer.finalize()
        text, stopped = self.stops.feed(self.detokenizer.last_segment)
        if stopped:
            self.finish = "stop"
        elif end:
            text += self.stops.flush()
        if text:
            self.text_parts.append(text)
            self.emit(Chunk(id=self.job.id, index=self.index, text=text, tokens=self.generated))
            self.index += 1
        if not (end or stopped or self.cancelled.is_set()):
            return False
        self._done()
        return True

    def _done(self) -> None:
        n_prompt = len(self.prompt)
        self.emit(Done(
            id=self.job.id,
            text="".join(self.text_parts),
            finish_reason=self.finish,
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=self.generated,
                        total_tokens=n_prompt + self.generated,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens)),
            ttft_ms=self.ttft_ms,
            duration_ms=(time.perf_counter() - self.start) * 1000,
            worker=self.worker,
        ))

    def on_leave(self, reason: str) -> None:
        """Left the batch (or the queue to it): "finished" (Done already emitted), "halted" (the worker is
        stopping) or "cancelled" (before it joined)."""
        if reason == "halted":
            self.emit(Halted())
        elif reason == "cancelled":
            self._done()
