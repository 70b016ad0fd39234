"""A job before it joins a batch: every check that can refuse it, and the prompt's token ids.

Everything that can refuse a job for what it asks is checked here, before the job joins a batch (and in a group,
before its prompt reaches the followers): the job's own fields, templating, the context length and
every sampling parameter, whoever submitted it (the HTTP ingress or a NATS submitter). A value that
would only fail inside the batch's sampling step would fail the whole batch; here it fails alone,
with a 400 naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import msgspec
from jinja2 import TemplateError, TemplateSyntaxError

from schemas.jobs import MAX_CHOICES, MAX_TOP_LOGPROBS, Job, SamplingParams
from schemas.openai import ErrorDetail
from workers.constrain import COMPILE_OPTIONS, Constraint, Grammars, SchemaError
from workers.shard import Shard, load_shard
from workers.store import model_context_length, model_revision
from workers.tools import NO_ARGUMENTS, ToolsError, check_tools, forced, forced_grammar, template_inputs, text_of

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
    max_token_bytes: int  # UTF-8 bytes of the longest vocabulary entry: no token covers more text than that
    grammars: Grammars  # response_format's JSON Schemas (workers/constrain.py)


def open_model(model_id: str, model_dir: Path, layout: str = "whole", group: mx.distributed.Group | None = None,
               split: list[int] | None = None) -> LoadedModel:
    shard = load_shard(model_dir, layout, group, split)
    context = model_context_length(Path(model_dir)) or int(getattr(shard.tokenizer, "model_max_length", 4096))
    longest = max((len(piece.encode()) for piece in shard.tokenizer.get_vocab()), default=1)
    return LoadedModel(model_id, shard, context, model_revision(Path(model_dir)), max(longest, 1),
                       Grammars(model_dir, shard.vocab_size, list(shard.tokenizer.eos_token_ids)))


def text_bytes(job: Job) -> int:
    """UTF-8 bytes of the job's prompt text, its tools and past calls included (0 for token ids)."""
    if job.kind == "chat":
        calls = [c.function.arguments for m in job.messages or [] for c in m.tool_calls or []]
        return (sum(len(text_of(m).encode()) for m in job.messages or []) + sum(len(a.encode()) for a in calls)
                + (len(msgspec.json.encode(job.tools)) if job.tools else 0))
    return len(job.prompt.encode()) if isinstance(job.prompt, str) else 0


def prompt_tokens(job: Job, tokenizer) -> list[int]:
    """The token ids the model sees: the chat template applied to the messages, or the raw prompt."""
    if job.kind == "chat":
        if not job.messages:
            raise JobError(400, "'messages' must be a non-empty array.", "messages", "missing_required_parameter")
        # Templates know system/user/assistant; OpenAI's newer "developer" role is a system message (and tools and
        # their calls are shown as the template can: workers/tools.py).
        messages, extra = template_inputs(job, tokenizer)
        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra))
        except TemplateSyntaxError:  # the model's template itself is broken: the server's fault, a 500
            raise
        except TemplateError as exc:  # the template refuses the conversation (`raise_exception`): the request's fault
            raise JobError(400, f"This model's chat template cannot render these messages: {exc}", "messages",
                           "invalid_value") from None
    if isinstance(job.prompt, list):
        vocab = tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in job.prompt):
            raise JobError(400, f"Prompt token ids must be in [0, {vocab}).", "prompt", "invalid_value")
        return list(job.prompt)
    if job.prompt is None:
        raise JobError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    return list(tokenizer.encode(job.prompt))


# OpenAI's ranges, and mlx-lm's for its own parameters: (lowest, highest, whether the lowest is excluded).
RANGES = {
    "temperature": (0.0, 2.0, False), "top_p": (0.0, 1.0, True), "min_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False), "frequency_penalty": (-2.0, 2.0, False),
    "repetition_penalty": (0.0, 10.0, True),
}


# Stop sequences are matched against every token of every answer, in the batch's step (workers/stops.py): bounded, so
# that no request slows the batch it shares (800,000 of them took 2 s a token). OpenAI takes up to 4; 16 leave room for
# the clients and agent frameworks that send more.
MAX_STOPS, MAX_STOP_CHARS = 16, 256


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Every job's sampling parameters, whoever submitted it (HTTP or NATS): the ranges the API promises,
    and everything MLX would reject in the middle of a batch's sampling step."""
    if len(params.stop) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in params.stop):
        raise JobError(400, f"Invalid 'stop': expected at most {MAX_STOPS} sequences of at most {MAX_STOP_CHARS} "
                       f"characters each, but got {len(params.stop)} (the longest {max(map(len, params.stop))} "
                       f"characters).", "stop", "invalid_value")
    for name, (low, high, open_low) in RANGES.items():
        value = getattr(params, name)
        if not (low < value if open_low else low <= value) or not value <= high:
            expected = f"above {low} and at most {high}" if open_low else f"between {low} and {high}"
            raise JobError(400, f"Invalid '{name}': expected a value {expected}, but got {value} instead.", name,
                           "invalid_value")
    if not -1 <= params.top_k <= vocab_size:
        raise JobError(400, f"Invalid 'top_k': expected 0 or -1 (no limit) or a value between 1 and {vocab_size} "
                       f"(this model's vocabulary), but got {params.top_k} instead.", "top_k", "invalid_value")
    if any(not -100.0 <= bias <= 100.0 for bias in params.logit_bias.values()):
        raise JobError(400, "Invalid 'logit_bias': expected a value between -100.0 and 100.0 for every token.",
                       "logit_bias", "invalid_value")
    if any(not 0 <= token < vocab_size for token in params.logit_bias):
        raise JobError(400, f"Invalid 'logit_bias': token ids must be in [0, {vocab_size}).", "logit_bias",
                       "invalid_value")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise JobError(400, f"Invalid 'logprobs': expected a number of alternatives between 0 and {MAX_TOP_LOGPROBS}, "
                       f"but got {params.logprobs} instead.", "logprobs", "invalid_value")
    if not 1 <= params.n <= MAX_CHOICES:
        raise JobError(400, f"Invalid 'n': expected a value between 1 and {MAX_CHOICES}, but got {params.n} instead.",
                       "n", "invalid_value")
    if params.seed is not None and not 0 <= params.seed < 2**64:
        raise JobError(400, f"Invalid 'seed': expected an integer in [0, 2**64), got {params.seed}.", "seed",
                       "invalid_value")


def check_limits(n_prompt: int, params: SamplingParams, context: int, param: str, default_max_tokens: int) -> int:
    """The number of tokens to generate, or a 400 if the request cannot fit the model's context.

    Without `max_tokens` a job gets the server's default (capped by what the context leaves), so a
    request that sends none cannot generate for as long as the context allows (8,192 tokens of a small
    model looping took 44 minutes here); a request may ask for more, up to the context.
    """
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
    return params.max_tokens if params.max_tokens is not None else min(default_max_tokens, context - n_prompt)


def prepare(loaded: LoadedModel, job: Job, default_max_tokens: int) -> tuple[list[int], int, list[Constraint | None]]:
    """The job's prompt ids, how many tokens it may generate, and the grammar each of its `n` answers must follow
    (None: free); JobError if it cannot run.

    A prompt whose text is longer than the context could hold even in the longest tokens, or with more messages than
    the context has tokens, is refused before it is tokenised: tokenising megabytes takes seconds on the one
    tokenizing thread, which every other job waits for.
    """
    param = "messages" if job.kind == "chat" else "prompt"
    try:  # before the tools are rendered into the prompt
        check_tools(job)
    except ToolsError as exc:
        raise JobError(400, str(exc), exc.param, exc.code) from None
    # And at least a token a message (its role's markers), even an empty one: 500,000 empty messages took 14 s to
    # template and tokenize before they were refused.
    least = max(text_bytes(job) // loaded.max_token_bytes, len(job.messages or []))
    if least > loaded.context_length:
        raise JobError(400, f"This model's maximum context length is {loaded.context_length} tokens. However, your "
                       f"{param} are at least {least} tokens. Please reduce the length of the {param}.", param,
                       "context_length_exceeded")
    tokens = prompt_tokens(job, loaded.shard.tokenizer)
    max_tokens = check_limits(len(tokens), job.params, loaded.context_length, param, default_max_tokens)
    check_params(job.params, loaded.shard.vocab_size)
    constraint = constraint_of(loaded.grammars, job)  # compiled once; each further answer gets a copy of its state
    return tokens, max_tokens, [constraint] + [constraint and constraint.copy() for _ in range(job.params.n - 1)]


def constraint_of(grammars: Grammars, job: Job) -> Constraint | None:
    """The grammar the job's answers must follow: its response_format's schema, or calls to the tools its tool_choice
    forces (workers/tools.py); None when they are free. Every tool's parameters must compile, forced or not."""
    for i, tool in enumerate(job.tools or []):
        try:
            grammars.constraint(tool.function.parameters or NO_ARGUMENTS)
        except SchemaError as exc:
            raise JobError(400, f"Invalid schema for function '{tool.function.name}': {exc}",
                           f"tools[{i}].function.parameters", "invalid_function_parameters") from None
    try:
        if (tools := forced(job)) is not None:
            return grammars.constraint_of_lark(forced_grammar(tools, job.parallel_tool_calls, COMPILE_OPTIONS))
        if job.params.json_schema is not None:
            return grammars.constraint(job.params.json_schema)
    except SchemaError as exc:
        detail = exc.detail("tools" if job.tools else "response_format")
        raise JobError(400, detail.message, detail.param, detail.code) from None
    return None
