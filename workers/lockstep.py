"""Generation that every rank of a group runs step for step, driven by the leader (rank 0).

The leader is the only rank that samples. Each decode step ends with one small broadcast (an
all_sum to which only the leader contributes) of a control pair `[token, go]`: every rank feeds the
same token to the next step, and `go = 0` tells every rank that no step follows the next one. A
single process runs the same loop with the broadcast reduced to nothing.

Like mlx-lm's `generate_step`, step k+1 is queued before step k's token is read, so the host-side work
(detokenising, stop strings, publishing) overlaps the model. Because of that a stop decided after
reading token k can only be announced in step k+2's control pair: a group runs two throwaway steps at
the end of a request, which costs two decode steps and keeps every rank's sequence of collectives
identical.

Before a request the leader sends followers the prompt the same way (`broadcast_prompt`).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from workers.shard import Shard

PREFILL_STEP = 512  # prompt tokens per forward pass during prefill (bounds activation memory)
Choose = Callable[[mx.array, mx.array], mx.array]  # (logits [1, V], tokens so far) -> next token [1]


def broadcast(shard: Shard, value: mx.array) -> mx.array:
    """The leader's `value` on every rank: an all_sum to which followers contribute zeros.

    Followers pass their zeros in (not zeroed here) so that a follower's zeros can carry a dependency
    on its own forward pass (`mx.depends`), which its collectives must run with.
    """
    if shard.group is None:
        return value
    return mx.distributed.all_sum(value, group=shard.group)


def broadcast_prompt(shard: Shard, prompt: list[int] | None) -> list[int]:
    """The leader's prompt token ids on every rank (followers pass None); [] when there is no job to run."""
    if shard.group is None:
        return list(prompt)
    length = broadcast(shard, mx.array([len(prompt) if shard.is_leader else 0], dtype=mx.int32)).item()
    if length == 0:  # the leader's job failed validation: nothing to run
        return []
    return broadcast(shard, mx.array(prompt if shard.is_leader else [0] * length, dtype=mx.int32)).tolist()


def lockstep_generate(shard: Shard, prompt: list[int], choose: Choose | None = None) -> Iterator[int]:
    """Yield the generated token ids (on the leader; followers get the same ids and ignore them).

    `choose` is the leader's sampler. Stop by closing the generator (`break` out of the loop): the
    group then finishes the two steps already announced and every rank returns.
    """
    cache = make_prompt_cache(shard.model)
    stopping = False
    tokens = mx.array(prompt, dtype=mx.int32)
    while tokens.size > 1:  # prefill all but the last prompt token
        n = min(PREFILL_STEP, tokens.size - 1)
        shard.forward(tokens[None, :n], cache, logits=False)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
        shard.last_step = time.monotonic()
    history = mx.array(prompt, dtype=mx.int32)

    def step(last: mx.array) -> mx.array:
        nonlocal history
        logits = shard.forward(last[None], cache, logits=True)
        if shard.is_leader:
            token = choose(logits, history).astype(mx.int32).reshape(1)
            control = mx.concatenate([token, mx.array([0 if stopping else 1], dtype=mx.int32)])
        else:
            control = mx.zeros((2,), dtype=mx.int32)
            if logits is not None:  # tensor parallel: the control pair must wait for this rank's forward
                control = mx.depends(control, logits)
        control = broadcast(shard, control)
        history = mx.concatenate([history, control[:1]])
        return control

    current = step(tokens)
    mx.async_eval(current)
    while True:
        following = step(current[:1])
        mx.async_eval(following)
        token, go = current.tolist()
        shard.last_step = time.monotonic()
        if not go:
            mx.eval(following)
            return
        if not stopping:
            try:
                yield token
            except GeneratorExit:
                if shard.group is None:
                    return
                stopping = True  # keep stepping, without yielding, until the announced steps are done
        current = following
