"""One job in the batch, on the leader: its sampler, its detokeniser and stop rules, and its events.

A `Generation` is the `Row` of workers/lockstep.py. It runs on the thread that owns the model and hands
its events (schemas/jobs.py) to `emit`; the worker process only moves them onto NATS.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import mlx.core as mx
import msgspec

from pipeline.limits import encoded_size
from schemas.jobs import Chunk, Done, Failed, Job
from schemas.openai import (ErrorDetail, NamedToolChoice, PromptTokensDetails, TokenLogprob, ToolCall, TopLogprob,
                            Usage)
from workers.constrain import Constraint
from workers.sampling import chooser, has_processors
from workers.stops import StopMatcher
from workers.tools import CallSplitter, call_format, forced, offered


LOGPROB_FLOOR = -9999.0


class Halted:
    """Marks a job dropped from the batch because the worker is stopping (it goes back to the queue)."""


class Generation:
    """One job in the batch, as the leader runs it."""

    def __init__(self, job: Job, prompt: list[int], max_tokens: int, tokenizer, vocab_size: int, worker: str,
                 emit: Callable, cancelled: threading.Event, start: float, attempt: int = 1,
                 output_limit: int = 1 << 62, constraint: Constraint | None = None, choice: int = 0):
        self.job = job
        self.choice = choice  # which of the job's `n` answers this row writes
        # The first of several answers leaves its prompt's cache for the others (workers/lockstep.py).
        self.share_prefill = choice == 0 and job.params.n > 1
        self.eos = tokenizer.eos_token_ids
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self.worker = worker
        self.emit = emit
        self.cancelled = cancelled
        self.start = start
        self.attempt = attempt
        # JSON-encoded bytes of output after which generation stops (`length`): pipeline/limits.py.
        self.output_limit = output_limit
        self.output_bytes = 0
        # Greedy rows are stepped by one argmax over the batch (workers/lockstep.py), which has no log probabilities.
        self.greedy = (job.params.temperature == 0 and not has_processors(job.params)
                       and job.params.logprobs is None and constraint is None)
        self.constraint = constraint  # the grammar its answer must follow (response_format): workers/constrain.py
        self.tokenizer = tokenizer
        # With params.logprobs: each sampled token's (logprob, top ids, top logprobs), in the order sampled; a token
        # is sampled one step before on_token takes it, so they wait here.
        self.sampled: deque = deque()
        self.unsent: list[TokenLogprob] = []  # taken tokens whose text has not gone out in a Chunk yet
        self.sent: list[TokenLogprob] = []
        self.pieces: dict[int, dict] = {}
        # mlx-lm's BPE detokeniser drops the first token's leading space: right for a chat answer, wrong for a
        # completion, whose text continues the prompt (" Paris" after "The capital of France is"). None: no token yet.
        self.lead_space: bool | None = None
        self.cached_tokens = 0  # set by the batch when the job joins it
        self.joined = 0.0  # when it left the waiting line for the batch (perf_counter)
        self.first_token = 0.0
        self._choose = None  # built on the model's thread, at the first step
        self.detokenizer = tokenizer.detokenizer  # a fresh copy per access
        # A forced tool call's end is the grammar's; a stop string (say "\n") must not cut it into text.
        self.stops = StopMatcher(job.params.stop if forced(job) is None else [])
        # With tools offered: the answer's calls, split from its text (workers/tools.py).
        format = call_format(job, tokenizer)
        self.calls = CallSplitter(format, offered(job)) if format is not None else None
        self.tool_calls: list[ToolCall] = []
        self.text_parts: list[str] = []
        self.generated = 0
        self.index = 0
        self.ttft_ms = 0.0
        self.finish = "length"

    def choose(self, logits: mx.array) -> mx.array:
        if self._choose is None:
            observe = self.observe if self.job.params.logprobs is not None else None
            params = self.job.params
            if params.seed is not None and self.choice:  # each answer its own draws, repeatable
                params = msgspec.structs.replace(params, seed=(params.seed + self.choice) % 2**64)
            self._choose = chooser(params, self.prompt, self.vocab_size, observe)
        if self.constraint is None:
            return self._choose(logits)
        # The grammar needs the token drawn before the next mask: this row's draw is read now, not a step later.
        token = self._choose(self.constraint.mask(logits))
        self.constraint.take(token.item())
        return token

    def observe(self, logprobs: mx.array, token: mx.array) -> None:
        """The distribution `token` was drawn from: its log probability and the `logprobs` most likely tokens', kept
        (as MLX arrays, evaluated with the step) until on_token takes the token."""
        # OpenAI's floor for a token that cannot come (a constrained row's masked tokens are -inf): JSON has no -inf.
        logprobs = mx.maximum(logprobs.reshape(-1), LOGPROB_FLOOR)
        top = self.job.params.logprobs
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top] if top else mx.array([], dtype=mx.uint32)
        entry = (logprobs[token[0]], ids, logprobs[ids])
        mx.async_eval(*entry)  # with the step's tokens: reading them in on_token then waits for nothing
        self.sampled.append(entry)

    def logprob_entry(self, token: int) -> TokenLogprob:
        chosen, ids, values = self.sampled.popleft()
        # Tokens that could not come (a constrained row's masked ones, at the floor) are no alternatives.
        alternatives = sorted(((i, lp) for i, lp in zip(ids.tolist(), values.tolist()) if lp > LOGPROB_FLOOR),
                              key=lambda pair: -pair[1])
        return TokenLogprob(**self.piece(token), logprob=chosen.item(),
                            top_logprobs=[TopLogprob(**self.piece(i), logprob=lp) for i, lp in alternatives])

    def piece(self, token: int) -> dict:
        """A token as OpenAI shows it: its text, and the UTF-8 bytes of that text (a token that is part of a
        character decodes to U+FFFD), decoded once per job."""
        if token not in self.pieces:
            text = self.tokenizer.decode([token])
            self.pieces[token] = {"token": text, "bytes": list(text.encode("utf-8"))}
        return self.pieces[token]

    def chunk(self, text: str, calls: list[ToolCall]) -> Chunk:
        """The next Chunk: `text` and `calls`, with the log probabilities of the tokens that brought them."""
        entries, self.unsent = self.unsent, []
        self.sent += entries
        chunk = Chunk(id=self.job.id, index=self.index, text=text, tokens=self.generated, attempt=self.attempt,
                      logprobs=entries, tool_calls=calls, choice=self.choice)
        self.index += 1
        return chunk

    def send(self, text: str, last: bool) -> None:
        """Emit the next piece of the answer: its text, and the tool calls it completed (workers/tools.py)."""
        calls: list[ToolCall] = []
        if self.calls is not None:
            text, calls = self.calls.feed(text)
            if last:
                rest, more = self.calls.flush()
                text, calls = text + rest, calls + more
        if not text and not calls:
            return
        self.text_parts.append(text)
        self.tool_calls += calls
        self.output_bytes += encoded_size(text) + (encoded_size(calls) if calls else 0)
        self.emit(self.chunk(text, calls))

    def on_token(self, token: int) -> bool:
        """Take the next generated token; True when the job is finished (its Done is emitted)."""
        self.generated += 1
        if self.generated == 1:
            self.first_token = time.perf_counter()
            self.ttft_ms = (self.first_token - self.start) * 1000
        eos = token in self.eos
        if self.job.params.logprobs is not None:
            entry = self.logprob_entry(token)
            if not eos:  # the end token brings no text, and OpenAI lists none for it
                self.unsent.append(entry)
                self.output_bytes += encoded_size(entry)
        end = eos or self.generated == self.max_tokens
        if eos:
            self.finish = "stop"
        else:
            self.detokenizer.add_token(token)
        if end:
            self.detokenizer.finalize()
        segment = self.detokenizer.last_segment
        if self.lead_space is None and not eos:
            self.lead_space = self.job.kind == "completion" and self.tokenizer.decode([token]).startswith(" ")
        if self.lead_space and segment:
            segment = segment if segment.startswith(" ") else " " + segment
            self.lead_space = False
        text, stopped = self.stops.feed(segment)
        if stopped:
            self.finish = "stop"
        elif end:
            text += self.stops.flush()
        self.send(text, last=end or stopped)
        # Text held back as a possible tool call counts too: it goes out as one piece at the end.
        held = len(self.calls.held.encode()) if self.calls is not None else 0
        if not end and not stopped and self.output_bytes + held >= self.output_limit:
            end = True  # as large as a message may carry: finish_reason stays "length"
            self.send(self.stops.flush(), last=True)
        if not (end or stopped or self.cancelled.is_set()):
            return False
        self.emit(self.result())
        return True

    def result(self) -> Done:
        """What the job has generated so far, as its final event."""
        n_prompt = len(self.prompt)
        return Done(
            id=self.job.id,
            text="".join(self.text_parts),
            finish_reason=self.finish_reason(),
            tool_calls=self.tool_calls or None,
            stop_sequence=self.stops.matched,
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=self.generated,
                        total_tokens=n_prompt + self.generated,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens)),
            ttft_ms=self.ttft_ms,
            duration_ms=(time.perf_counter() - self.start) * 1000,
            worker=self.worker,
            attempt=self.attempt,
            # The tokens whose text went out (those of a stop sequence, cut from the text, are left out too); a
            # streamed job had them in its chunks.
            logprobs=self.sent if self.job.params.logprobs is not None and not self.job.stream else None,
        )

    def finish_reason(self) -> str:
        """"tool_calls" when the answer made calls, as OpenAI's, except when tool_choice named the function: then
        "stop", as OpenAI's too."""
        if self.tool_calls and self.finish == "stop" and not isinstance(self.job.tool_choice, NamedToolChoice):
            return "tool_calls"
        return self.finish

    def fail(self, exc: Exception) -> None:
        """Sampling or finishing this row raised: this job fails, the rest of the batch goes on."""
        self.emit(Failed(id=self.job.id, status=500, attempt=self.attempt, error=ErrorDetail(
            message=f"The worker failed while generating: {type(exc).__name__}: {exc}", type="server_error",
            code="worker_error")))

    def on_leave(self, reason: str) -> None:
        """Left the batch (or the queue to it): "finished" (its final event was emitted), "halted" (the
        worker is stopping) or "cancelled" (before it joined)."""
        if reason == "halted":
            self.emit(Halted())
        elif reason == "cancelled":
            self.emit(self.result())
