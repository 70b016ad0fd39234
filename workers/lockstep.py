"""Continuous batching that every rank of a group runs step for step, driven by the leader (rank 0).

One decode step runs every request in the batch at once (mlx-lm's `BatchKVCache`: left-padded rows,
one mask). Between steps the leader changes the batch: requests that finished leave, new ones join.
Requests waiting together join together: they are prefilled as one group (mlx-lm's right padding of
the shorter prompts, rolled into left padding once all are in), into a cache of their own, each row
starting empty or from a copy of its cached prefix (see below), one chunk of the group's prompts per
step, so the rows already running keep decoding meanwhile; then the group is merged into the batch,
and each row's last prompt token goes in with the next batched step, so its first token comes out of
the same kind of step as every later one. Why groups: prefilled one by one, the 16th of 16 requests
arriving at once waited for 15 prefills and 15 steps (10 s to its first token on a 2-core CPU);
prefilled together, the weights are read once per chunk for all of them.

Like mlx-lm's `GenerationBatch`, step k+1 is queued before step k's tokens are read, so host work
(detokenising, stop strings, publishing) overlaps the model; a request that finishes at step k has
run one extra, discarded row in step k+1.

A request whose own sampling or bookkeeping raises (`choose`, `on_token`) fails alone: its row is
marked finished with a placeholder token (greedy) and leaves at the next step, and every other row goes
on. Only an exception in the step itself (the forward pass, a collective) takes the whole batch.

Groups: only the leader samples and decides. Each step ends with one broadcast (an all_sum to which
only the leader contributes) of the sampled tokens, so every rank feeds the same tokens to the next
step. Before each step the leader broadcasts the plan: which rows stay, which requests join (their
prompt ids, then how much of each comes from the prefix cache), whether the prefill under way is
abandoned (all its requests were cancelled, or the leader is stopping), and whether the batch is done; every
rank applies it the same way, so batch shapes and collectives match on every rank. A single process
runs the same loop with the broadcasts reduced to nothing.

Prefix cache: a finished request's KV cache is kept (mlx-lm's `LRUPromptCache`, by token ids). A new
request whose prompt shares a prefix with a kept one (the next turn of a chat) starts from a copy of
it and prefills only the rest. The cache is bounded by bytes as the leader counts them; after rows
leave, the leader broadcasts how many entries it evicted, and every rank drops that many of its oldest
(ranks of a pipeline hold different bytes, but the same entries in the same order).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

import mlx.core as mx
from mlx_lm.generate import _extend_cache, _merge_caches
from mlx_lm.models.cache import (KVCache, LRUPromptCache, can_trim_prompt_cache, make_prompt_cache,
                                 trim_prompt_cache)

from workers.shard import Shard
from workers.status import Progress

# Prompt tokens a joining request prefills per step (one forward pass: it also bounds activation memory).
# A longer prompt is prefilled over several steps, between which the rows already running each decode a
# token: a long prompt slows the others down instead of stopping them.
PREFILL_CHUNK = 512
# A group of joining requests holds at most this many chunks of prompt tokens, every prompt counted whole (a cached
# prefix too: the group's cache is padded to its longest) and as long as the longest (a request that would take it
# past joins with the next group; one alone always joins). Padding is work thrown away, so a long prompt does not join
# short ones: their first tokens would wait for its whole prefill.
PREFILL_GROUP_CHUNKS = 4
PREFIX_KEY = "model"  # LRUPromptCache keys by model; a worker serves one


class Row(Protocol):
    """One request in the batch, as the leader sees it (workers/generation.py: Generation)."""

    prompt: list[int]
    greedy: bool  # argmax without logits processors: sampled for the whole batch at once
    cached_tokens: int  # set when it joins: prompt tokens taken from the prefix cache
    cancelled: threading.Event  # read by the leader: a prefill stops once all its requests are cancelled
    # The first of several answers to a prompt (`n`): its prompt's cache goes into the prefix cache once prefilled,
    # so that the others start from it instead of a prefill of their own (it is the last of its group).
    share_prefill: bool

    def choose(self, logits: mx.array) -> mx.array: ...  # [1, vocab] -> [1]

    def on_token(self, token: int) -> bool: ...  # True: this request is finished

    def fail(self, exc: Exception) -> None: ...  # sampling or finishing this row raised: it ends here

    def on_leave(self, reason: str) -> None: ...  # "finished", "halted" (the leader stops) or "cancelled"


# The leader's source of joining requests: `admit(fits)` hands over the first request waiting if `fits(it)`, else None;
# `admit(None)` hands over none (the caller may still end waiting requests that were cancelled).
Admit = Callable[[Callable[[Row], bool] | None], Row | None]


def admit_from(waiting: list) -> Admit:
    """An `Admit` over a plain list, first come first (it takes from the list): for callers without a queue of their
    own (workers/generate.py, tests). The worker's queue is workers/scheduler.py's `admit`."""

    def admit(fits: Callable[[Row], bool] | None) -> Row | None:
        return waiting.pop(0) if fits is not None and waiting and fits(waiting[0]) else None

    return admit


class FollowerRow:
    """A follower's view of a request: only its tokens, for the prefix cache."""

    cached_tokens = 0

    def __init__(self, prompt: list[int], share_prefill: bool):
        self.prompt = prompt
        self.share_prefill = share_prefill

    def on_leave(self, reason: str) -> None:
        pass


def plain_kv(shard: Shard) -> bool:
    """Whether every rank's layers keep a plain, trimmable KV cache (a collective, in a group).

    The prefix cache needs it on every rank alike: mlx-lm's LRUPromptCache prunes and trims entries only
    when they are trimmable, so a pipeline stage with sliding-window layers would keep other entries than
    a stage without, and the group's caches would drift apart. Such models run without a prefix cache.
    """
    plain = all(type(c) is KVCache for c in make_prompt_cache(shard.model))
    if shard.group is None:
        return plain
    return mx.distributed.all_sum(mx.array([0 if plain else 1]), group=shard.group).item() == 0


def broadcast(shard: Shard, value: mx.array) -> mx.array:
    """The leader's `value` on every rank: an all_sum to which followers contribute zeros.

    Followers pass their zeros in (not zeroed here) so that a follower's zeros can carry a dependency
    on its own forward pass (`mx.depends`), which its collectives must run with.
    """
    if shard.group is None:
        return value
    return mx.distributed.all_sum(value, group=shard.group)


def broadcast_list(shard: Shard, values: list[int] | None, length: int) -> list[int]:
    """The leader's `values` (of a length every rank knows) as a list on every rank."""
    if shard.group is None or length == 0:
        return list(values or [])
    array = mx.array(values if shard.is_leader else [0] * length, dtype=mx.int32)
    return broadcast(shard, array).tolist()


class _Member:
    """A row of the batch: the request plus the token ids its KV cache holds."""

    def __init__(self, row, cached: list[int]):
        self.row = row
        self.tokens = cached  # ids in this row's KV cache (prompt, then every token fed back)
        self.fresh = True  # the first token read back is the last prompt token, not a generated one
        self.finished = False


class _Prefill:
    """Requests joining the batch together, prefilled one chunk per step into a batch cache of their own."""

    def __init__(self, rows: list, cache: list, tokens: list[list[int]], padded: bool):
        self.rows = rows
        self.cache = cache  # extended into the batch once the prompts are in
        self.tokens = tokens  # per row, the prompt ids to prefill (not the last: it goes in with a decode step)
        self.padded = padded  # right-padded to the longest when their lengths differ
        self.done = 0  # columns of `tokens` prefilled


class BatchEngine:
    """The batch and the prefix cache of one rank. Runs on the thread that owns the model."""

    def __init__(self, shard: Shard, max_batch: int = 16, prefix_cache_bytes: int = 4 << 30,
                 prefill_chunk: int = PREFILL_CHUNK, progress: Progress | None = None):
        self.shard = shard
        self.progress = progress if progress is not None else Progress()  # tokens stepped, for the liveness file
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        # Bounded by the leader's bytes alone (no count limit): see `_evict`.
        self.prefix_cache_bytes = prefix_cache_bytes
        # Only plain KV caches take right padding safely (mlx-lm's rotating and recurrent caches would run the padding
        # through their window or state): other models join in groups of equal prompt lengths, and without a prefix
        # cache (see `plain_kv`).
        self.plain = plain_kv(shard)
        self.prefixes = LRUPromptCache(max_size=1 << 62) if prefix_cache_bytes > 0 and self.plain else None
        self.members: list[_Member] = []
        self.prefill_group_tokens = PREFILL_GROUP_CHUNKS * prefill_chunk
        self.joining: list = []  # admitted by the plan, not yet prefilling: `drop` must hand them back too
        self.prefilling: _Prefill | None = None
        self.cache: list = []  # one BatchKVCache per layer (of this rank)
        self.next_tokens: mx.array | None = None  # the tokens the next step feeds, one per row
        self.halt = False  # set from any thread: the leader drops every row at the next plan

    # -- the plan ------------------------------------------------------------------------------------

    def _plan(self, admit: Admit | None) -> tuple[bool, list[int]]:
        """(done, rows to keep), the leader's decision on every rank. Requests that start joining are put in
        `joining`; a prefill the leader abandons (all its requests were cancelled, or the leader is stopping)
        ends here on every rank.

        A group joins only when no prefill is under way: its requests are prefilled together (each from its own
        prefix-cache entry), and a request arriving meanwhile joins with the next group.
        """
        shard = self.shard
        size = len(self.members)
        halted = self.halt  # read once: another thread may set it meanwhile
        if shard.is_leader:
            keep = [i for i, m in enumerate(self.members) if not m.finished and not halted]
            prefilling = self.prefilling
            abandon = prefilling is not None and (halted or all(r.cancelled.is_set() for r in prefilling.rows))
            if not halted and admit is not None:
                self.joining = self._admit_group(admit, self.max_batch - len(keep) if prefilling is None or abandon
                                                 else 0)
            done = not keep and not self.joining and (prefilling is None or abandon)
            header = [int(done), int(abandon), len(self.joining)] + [1 if i in keep else 0 for i in range(size)]
        else:
            header = None
        header = broadcast_list(shard, header, 3 + size)
        done, abandon, joining = header[:3]
        keep = [i for i, flag in enumerate(header[3:]) if flag]
        if abandon:
            rows, self.prefilling = self.prefilling.rows, None
            for row in rows:
                row.on_leave("halted" if halted else "cancelled")
        if joining:
            rows = self.joining if shard.is_leader else None
            shape = broadcast_list(shard, [len(r.prompt) for r in rows] + [int(r.share_prefill) for r in rows]
                                   if rows else None, 2 * joining)
            lengths, shares = shape[:joining], shape[joining:]
            ids = broadcast_list(shard, [t for r in rows for t in r.prompt] if rows else None, sum(lengths))
            if not shard.is_leader:
                starts = [sum(lengths[:i]) for i in range(joining)]
                self.joining = [FollowerRow(ids[a:a + n], bool(share)) for a, n, share in zip(starts, lengths, shares)]
        return bool(done), keep

    def _admit_group(self, admit: Admit, room: int) -> list:
        """The leader's next joining group: waiting requests in their order, while there is room in the batch and
        the group's padded prompts stay within `prefill_group_tokens`. A request that shares its prefill (`n`) ends
        its group: the others wait for its cache."""
        rows: list = []

        def fits(row) -> bool:
            if not rows:
                return True
            if not self.plain and len(row.prompt) != len(rows[0].prompt):
                return False
            longest = max(len(row.prompt), *(len(r.prompt) for r in rows))
            return (len(rows) < room and not (rows[-1].share_prefill and self.prefixes is not None)
                    and (len(rows) + 1) * longest <= self.prefill_group_tokens)

        while (row := admit(fits if room > 0 else None)) is not None:
            rows.append(row)
        return rows

    def _reuse(self, rows: list) -> list[tuple[list | None, int]]:
        """Each joining row's prefix-cache entry (a copy) and how many prompt tokens it covers, the
        leader's choice on every rank. Ranks hold different layers, and whether an entry can be trimmed
        depends on a rank's cache types, so followers do not choose: they cut their entry to the
        leader's length, and a follower that has less fails the batch (the group restarts) rather than
        prefill a different number of tokens from its peers."""
        found = []
        for row in rows:
            head = row.prompt[:-1]
            cache, rest = (None, head)
            if self.prefixes is not None and head:
                cache, rest = self.prefixes.fetch_nearest_cache(PREFIX_KEY, head)
            found.append((cache, len(head) - len(rest) if cache is not None else 0))
        if self.shard.group is None:
            return found
        wants = broadcast_list(self.shard, [n for _, n in found] if self.shard.is_leader else None, len(rows))
        reused = []
        for (cache, n), want in zip(found, wants):
            if n < want:
                raise RuntimeError(f"prefix cache out of step with the leader: {n} tokens cached, {want} expected")
            if want == 0:
                cache = None
            elif n > want:
                if not can_trim_prompt_cache(cache):
                    raise RuntimeError("prefix cache out of step with the leader: cannot trim an entry")
                trim_prompt_cache(cache, n - want)
            reused.append((cache, want))
        return reused

    # -- changing the batch --------------------------------------------------------------------------

    def _leave(self, keep: list[int]) -> None:
        if len(keep) == len(self.members):
            return
        kept = set(keep)
        for i, member in enumerate(self.members):
            if i in kept:
                continue
            if self.prefixes is not None:  # (on every rank alike: followers do not know `finished`)
                entry = [c.extract(i) for c in self.cache]
                mx.eval([c.state for c in entry])
                self.prefixes.insert_cache(PREFIX_KEY, member.tokens, entry)
            member.row.on_leave("finished" if member.finished else "halted")
        if self.prefixes is not None:
            self._evict()
        self.members = [self.members[i] for i in keep]
        if not keep:
            self.cache, self.next_tokens = [], None
            return
        for c in self.cache:
            c.filter(keep)
        self.next_tokens = self.next_tokens[mx.array(keep)]

    def _evict(self) -> None:
        """Keep the prefix cache within its bytes, the same entries on every rank.

        Only the leader measures: ranks hold different layers, hence different bytes. Every rank inserted
        the same entries in the same order (fetching does not reorder them), so dropping the same number
        of the oldest, as the leader announces, keeps every rank's prefix cache the same.
        """
        leader = self.shard.is_leader
        before = len(self.prefixes)
        if leader:
            self.prefixes.trim_to(n_bytes=self.prefix_cache_bytes)
        (evicted,) = broadcast_list(self.shard, [before - len(self.prefixes)] if leader else None, 1)
        if not leader and evicted:
            self.prefixes.trim_to(n_sequences=before - evicted)

    def _start(self) -> None:
        """Begin the joining group's prefill: its cache (a batch of its rows) starts as their prefix-cache entries,
        or empty; the rest of each prompt, all but the last token, is prefilled by `_prefill_chunk`.

        Batch caches from the start: prefilling plain caches and merging them afterwards costs a copy, and
        a second one at the first step (the merged buffer has no room to grow): about 10 ms of time to
        first token on the development machine."""
        rows = self.joining  # still there for `drop` until `prefilling` holds them
        entries, tokens = [], []
        for row, (entry, reused) in zip(rows, self._reuse(rows)):
            row.cached_tokens = reused
            entries.append(entry if entry is not None else make_prompt_cache(self.shard.model))
            tokens.append(row.prompt[reused:-1])
        cache = _merge_caches(entries)
        lengths = [len(t) for t in tokens]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        if any(padding):  # as mlx-lm's PromptProcessingBatch: the cache rolls the padding to the left at the end
            for c in cache:
                c.prepare(lengths=lengths, right_padding=padding)
        tokens = [t + [0] * pad for t, pad in zip(tokens, padding)]
        self.prefilling, self.joining = _Prefill(rows, cache, tokens, any(padding)), []

    def _prefill_chunk(self) -> None:
        """One chunk of the joining group's prompts (`prefill_chunk` tokens in all); once all of them are in, the
        group joins the batch."""
        prefill = self.prefilling
        width = max(1, self.prefill_chunk // len(prefill.rows))
        chunk = [t[prefill.done:prefill.done + width] for t in prefill.tokens]
        if chunk[0]:
            self.shard.forward(mx.array(chunk, dtype=mx.int32), prefill.cache, logits=False)
            mx.eval([c.state for c in prefill.cache])
            prefill.done += len(chunk[0])
            self.shard.last_step = time.monotonic()
        if prefill.done < len(prefill.tokens[0]):
            return
        if prefill.padded:
            for c in prefill.cache:
                c.finalize()
        rows = prefill.rows
        # (every rank alike: the leader's plan said so, and each rank has the prompts). A one-token prompt left
        # nothing in its cache to share.
        for i, row in enumerate(rows):
            if self.prefixes is not None and row.share_prefill and len(row.prompt) > 1:
                entry = [c.extract(i) for c in prefill.cache]
                mx.eval([c.state for c in entry])
                self.prefixes.insert_cache(PREFIX_KEY, row.prompt[:-1], entry)
                self._evict()
        self.members.extend(_Member(row, row.prompt[:-1]) for row in rows)
        self.prefilling = None
        self.cache = _extend_cache(self.cache, prefill.cache)
        last = mx.array([row.prompt[-1] for row in rows], dtype=mx.int32)
        self.next_tokens = last if self.next_tokens is None else mx.concatenate([self.next_tokens, last])

    # -- one step ------------------------------------------------------------------------------------

    def _fail(self, member: _Member, exc: Exception) -> None:
        """One row's own work raised: that request ends, the batch does not (the leader's call, so a group
        stays in step: followers only ever see the tokens)."""
        member.finished = True
        member.row.fail(exc)

    def _choose(self, member: _Member, logits: mx.array) -> mx.array:
        try:
            return member.row.choose(logits).reshape(1)
        except Exception as exc:
            self._fail(member, exc)
            return mx.argmax(logits, axis=-1).reshape(1)

    def _sample(self, logits: mx.array | None) -> mx.array:
        """The next token of every row: sampled on the leader, broadcast to the followers."""
        shard = self.shard
        if shard.is_leader:
            if all(m.row.greedy for m in self.members):
                tokens = mx.argmax(logits, axis=-1)
            else:
                tokens = mx.concatenate([self._choose(m, logits[i:i + 1]) for i, m in enumerate(self.members)])
            return broadcast(shard, tokens.astype(mx.int32))
        tokens = mx.zeros((len(self.members),), dtype=mx.int32)
        if logits is not None:  # tensor parallel: the broadcast must wait for this rank's forward
            tokens = mx.depends(tokens, logits)
        return broadcast(shard, tokens)

    def _step(self) -> None:
        fed = self.next_tokens
        logits = self.shard.forward(fed[:, None], self.cache, logits=True)
        self.next_tokens = self._sample(logits)
        mx.async_eval(self.next_tokens)
        values = fed.tolist()
        self.shard.last_step = time.monotonic()
        for member, token in zip(self.members, values):
            member.tokens.append(token)
            if member.fresh:
                member.fresh = False
                continue
            self.progress.tokens += 1
            if self.shard.is_leader and not member.finished:
                try:
                    member.finished = member.row.on_token(token)
                except Exception as exc:
                    self._fail(member, exc)

    def run(self, admit: Admit | None = None) -> None:
        """Step until the batch is empty and nothing joins (the leader's call, with the requests waiting to
        join: `Admit`). Followers call it without `admit` and return when the leader's plan says the batch is
        done.

        On an exception the batch is kept as it was: the caller takes its rows with `drop`.
        """
        try:
            while True:
                done, keep = self._plan(admit)
                self._leave(keep)
                if done:
                    return
                if self.joining:
                    self._start()
                if self.prefilling is not None:
                    self._prefill_chunk()
                if self.members:
                    self._step()
        finally:
            mx.synchronize()  # the last, discarded step may still be running

    def drop(self) -> list:
        """Empty the batch (after a failed step) and return the rows it held."""
        rows = [m.row for m in self.members]
        if self.prefilling is not None:
            rows.extend(self.prefilling.rows)
        rows.extend(self.joining)
        self.members, self.joining, self.prefilling, self.cache, self.next_tokens = [], [], None, [], None
        return rows
