"""Grammar-constrained decoding: an answer that must be JSON matching a JSON Schema (`response_format`).

The engine is llguidance (MIT, the Guidance project's; no torch), chosen over xgrammar (imports torch) and
outlines-core (compiles an index per schema in hundreds of ms, and silently ignores `not` or `minimum`): it
compiles a schema in about 2 ms, fills the mask of allowed tokens in about 0.1 ms for a 49k vocabulary, and names
what it cannot honour ("Unimplemented keys: ["not"]"), which becomes the request's 400.

It runs on the leader, where every row is sampled (workers/lockstep.py), so every layout gets it: before its
sampler, a constrained row's logits lose every token the grammar does not allow next; after, the grammar takes
the token drawn. Once the JSON is complete only the end token is allowed. llguidance's own MLX helper is a Metal
kernel (it fails on Linux CPU), so the mask is unpacked with numpy and applied with `mx.where`, which runs on
every backend.
"""

from __future__ import annotations

import threading
from pathlib import Path

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

from schemas.openai import ErrorDetail

# A small model free to put whitespace anywhere can loop on it forever: the JSON it writes is compact.
COMPILE_OPTIONS = {"whitespace_flexible": False}


class SchemaError(ValueError):
    """A schema the engine cannot honour; the message says what (it becomes the request's 400)."""

    def detail(self, param: str) -> ErrorDetail:
        return ErrorDetail(message=f"Invalid schema for 'response_format': {self}", type="invalid_request_error",
                           param=param, code="invalid_json_schema")


class Grammars:
    """One model's: its vocabulary as llguidance reads it (made at the first constrained request, about 0.5 s, from
    the model directory's tokenizer files), and the check of each request's schema."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: list[int]):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self.lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer  # (mlx-lm's dependency) only when a schema is first asked for

                hf = AutoTokenizer.from_pretrained(str(self.model_dir))
                self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=self.eos_ids)
            return self._tokenizer

    def grammar(self, schema: dict) -> str:
        """The compiled grammar of `schema`; SchemaError naming what cannot be honoured."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise SchemaError(str(exc)) from None
        if problem := llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer()):
            raise SchemaError(problem)
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(llguidance.LLMatcher(self.tokenizer(), grammar), self.vocab_size)


class Constraint:
    """One row's grammar state: which tokens may come next, and the tokens it took."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: mx.array) -> mx.array:
        """`logits` (1, vocab) with every token the grammar refuses next at -inf."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # Bit i of the mask's 32-bit words (little-endian) allows token i. Unpacked with numpy, on this thread: an
        # MLX array made on another thread would belong to that thread's stream.
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:logits.shape[-1]]
        return mx.where(mx.array(allowed.astype(np.bool_)).reshape(1, -1), logits, -mx.inf)

    def take(self, token: int) -> None:
        self.matcher.consume_token(token)
