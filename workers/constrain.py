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

import json
import threading
from pathlib import Path

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

from schemas.openai import ErrorDetail

# Forced on every schema, whatever its own "x-guidance" asks: a small model free to put whitespace anywhere can loop
# on it forever (the JSON it writes is compact), and a keyword the engine cannot honour is an error, never ignored.
COMPILE_OPTIONS = {"whitespace_flexible": False, "lenient": False}
MAX_SCHEMA_BYTES = 100_000  # a schema's JSON: compiling one this large takes about a second here
# The parser's widest grammar row: its default (2,000) refuses an object of about 500 properties only once the answer
# reaches it; OpenAI accepts 5,000 properties, which a schema under MAX_SCHEMA_BYTES stays within.
LIMITS = llguidance.LLParserLimits(max_items_in_row=25_000)


class SchemaError(ValueError):
    """A schema the engine cannot honour; the message says what (it becomes the request's 400)."""

    def detail(self, param: str) -> ErrorDetail:
        return ErrorDetail(message=f"Invalid schema for '{param}': {self}", type="invalid_request_error",
                           param=param, code="invalid_json_schema")


def engine_call(call, *args):
    """`call(*args)` with llguidance's Rust panics (pyo3's PanicException, a BaseException that `except Exception`
    lets through, to the end of the batch) turned into RuntimeError."""
    try:
        return call(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"the grammar engine failed: {exc}") from None


class Grammars:
    """One model's: its vocabulary as llguidance reads it (made at the first constrained request, about 0.5 s, from
    the model directory's tokenizer files), and each request's constraint."""

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

    def constraint(self, schema: dict) -> Constraint:
        """A fresh constraint to JSON matching `schema`, compiled here (on the tokenizing thread, not the event
        loop's); SchemaError naming what cannot be honoured."""
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes of JSON")
        return self.compile(lambda: llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPILE_OPTIONS))

    def constraint_of_lark(self, grammar: str) -> Constraint:
        """A fresh constraint to an llguidance Lark grammar (a forced tool call: workers/tools.py)."""
        return self.compile(lambda: llguidance.LLMatcher.grammar_from_lark(grammar))

    def compile(self, grammar) -> Constraint:
        try:
            matcher = engine_call(lambda: llguidance.LLMatcher(self.tokenizer(), grammar(), log_level=0, limits=LIMITS))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise SchemaError(str(exc)) from None
        if matcher.is_error():
            raise SchemaError(matcher.get_error())
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One row's grammar state: which tokens may come next, and the tokens it took."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: mx.array) -> mx.array:
        """`logits` (1, vocab) with every token the grammar refuses next at -inf."""
        engine_call(llguidance.numpy.fill_next_token_bitmask, self.matcher, self.bitmask, 0)
        # Bit i of the mask's 32-bit words (little-endian) allows token i. Unpacked with numpy, on this thread: an
        # MLX array made on another thread would belong to that thread's stream.
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:logits.shape[-1]]
        return mx.where(mx.array(allowed.astype(np.bool_)).reshape(1, -1), logits, -mx.inf)

    def copy(self) -> Constraint:
        """The same grammar from the same state, for another answer (no second compile)."""
        return Constraint(engine_call(self.matcher.deep_copy), self.vocab_size)

    def take(self, token: int) -> None:
        """The token drawn; a grammar that fails here (beyond a limit of the parser) fails the row, with why."""
        if not engine_call(self.matcher.consume_token, token):
            raise RuntimeError(f"the JSON Schema's grammar failed while generating: {self.matcher.get_error()}")
