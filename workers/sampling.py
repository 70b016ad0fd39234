"""One request's sampler: mlx-lm's logits processors and filters, drawn from the request's own random key."""

from __future__ import annotations

import secrets
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from schemas.jobs import SamplingParams


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


def sampling_parts(params: SamplingParams, vocab_size: int) -> tuple[list, list]:
    """mlx-lm's logits processors and logit filters for these parameters (the sampling itself is ours:
    it draws from the request's own random key, see `chooser`)."""
    processors = make_logits_processors(**processor_arguments(params))
    filters = []
    if params.top_p < 1.0:  # OpenAI's top_p=1 means "off"
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if 0 < params.top_k < vocab_size:  # 0 and -1 mean "off", and so does keeping the whole vocabulary
        filters.append(lambda x: apply_top_k(x, params.top_k))
    return processors, filters


def chooser(params: SamplingParams, prompt: list[int], vocab_size: int,
            observe: Callable[[mx.array, mx.array], None] | None = None) -> Callable[[mx.array], mx.array]:
    """One request's sampler, as mlx-lm's `generate_step` samples: logits processors (which see the
    tokens so far), log-softmax, filters, then argmax or a draw at the temperature. `observe(logprobs, token)`,
    if given, sees the log-softmax the token was drawn from (before temperature and filters) and the token.

    The draw uses a random key of the request's own, from its `seed` (or a random one): MLX's global
    generator is shared by every request in the batch, so a seeded request would otherwise depend on
    what else was running.
    """
    processors, filters = sampling_parts(params, vocab_size)
    history = mx.array(prompt, dtype=mx.int32)
    key = mx.random.key(params.seed if params.seed is not None else secrets.randbits(64))

    def choose(logits: mx.array) -> mx.array:
        nonlocal history, key
        for processor in processors:
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # What is reported: before the filters (which set what they remove to -inf), in float32 (bf16 logits would
        # round a log probability to 0.03).
        wide = logits.astype(mx.float32) if observe is not None else None
        observed = None if wide is None else wide - mx.logsumexp(wide, axis=-1, keepdims=True)
        if params.temperature == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            for method in filters:
                logprobs = method(logprobs)
            key, draw = mx.random.split(key)
            token = mx.random.categorical(logprobs * (1 / params.temperature), key=draw)
        token = token.astype(mx.int32).reshape(1)
        if observe is not None:
            observe(observed, token)
        if processors:
            history = mx.concatenate([history, token])
        return token

    return choose
