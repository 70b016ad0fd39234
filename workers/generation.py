"""One job in the batch, on the leader: its sampler, its detokeniser and stop rules, and its events.

A `Generation` is the `Row` of workers/lockstep.py. It runs on the thread that owns the model and hands
its events (schemas/jobs.py) to `emit`; the worker process only moves them onto NATS.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import mlx.core as mx

from pipeline.limits import encoded_size
from schemas.jobs import Chunk, Done, Failed, Job
from schemas.openai import ErrorDetail, PromptTokensDetails, Usage
from workers.sampling import chooser, has_processors
from workers.stops import StopMatcher


class Halted:
    """Marks a job dropped from the batch because the worker is stopping (it goes back to the queue)."""


class Generation:
    """One job in the batch, as the leader runs it."""

    def __init__(self, job: Job, prompt: list[int], max_tokens: int, tokenizer, vocab_size: int, worker: str,
                 emit: Callable, cancelled: threading.Event, start: float, attempt: int = 1,
                 output_limit: int = 1 << 62):
        self.job = job
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
        self.greedy = job.params.temperature == 0 and not has_processors(job.params)
        self.cached_tokens = 0  # set by the batch when the job joins it
        self.joined = 0.0  # when it left the waiting line for the batch (perf_counter)
        self.first_token = 0.0
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
            self._choose = chooser(self.job.params, self.prompt, self.vocab_size)
        return self._choose(logits)

    def on_token(self, token: int) -> bool:
        """Take the next generated token; True when the job is finished (its Done is emitted)."""
        self.generated += 1
        if self.generated == 1:
            self.first_token = time.perf_counter()
            self.ttft_ms = (self.first_token - self.start) * 1000
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
            self.output_bytes += encoded_size(text)
            self.emit(Chunk(id=self.job.id, index=self.index, text=text, tokens=self.generated,
                            attempt=self.attempt))
            self.index += 1
        if not end and not stopped and self.output_bytes >= self.output_limit:
            end = True  # as large as a message may carry: finish_reason stays "length"
            text = self.stops.flush()
            if text:
                self.text_parts.append(text)
                self.emit(Chunk(id=self.job.id, index=self.index, text=text, tokens=self.generated,
                                attempt=self.attempt))
                self.index += 1
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
            finish_reason=self.finish,
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=self.generated,
                        total_tokens=n_prompt + self.generated,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens)),
            ttft_ms=self.ttft_ms,
            duration_ms=(time.perf_counter() - self.start) * 1000,
            worker=self.worker,
            attempt=self.attempt,
        )

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
