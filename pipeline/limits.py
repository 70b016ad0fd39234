"""How large and how deep a message may be, decided once and enforced where messages enter.

nats-server refuses a message whose payload and headers exceed its `max_payload` by closing the
publisher's connection, so no Conclave process may ever publish one. Every size is therefore a share
of the server's `max_payload` (read from the server at connect time, so an operator's `--nats-url`
server with the 1 MiB default gets smaller limits rather than broken connections):

- a job (the request as queued) is at most 1/4 of it: the ingress answers 413 beyond that, a worker
  refuses a larger NATS job with `job_too_large`;
- a job's output is at most 1/2 of it, counted as JSON-encoded bytes: generation stops there with
  `finish_reason` `length`;
- so the largest message anyone publishes, the audit record (job + output + a few fields), stays
  under 3/4 of it, and the final event (output + usage) under 1/2.

The embedded nats-server runs with 32 MiB: jobs up to 8 MiB (far more than the longest context of any
current model in text), outputs up to 16 MiB.

JSON nesting is limited too (64 levels): msgspec decodes nested values recursively, and 100,000
levels of `[` inside `tools` raised RecursionError (a 500) instead of a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec
import numpy as np

EMBEDDED_MAX_PAYLOAD = 32 * 2**20
MAX_JSON_DEPTH = 64
LARGE_MESSAGE = 2**20  # scanning a message this large for its nesting takes long enough to leave the event loop

# What decoding untrusted JSON raises: msgspec's errors, and RecursionError past about 1,000 levels of nesting (msgspec
# recurses, into the fields it skips too). Every reader of what another process wrote catches both: one value nested
# that deep under a node's key would otherwise stop every reader of the bucket.
UNDECODABLE = (msgspec.MsgspecError, RecursionError)
_encode = msgspec.json.Encoder().encode
# A JSON string, escapes included, or an unterminated one to the end (the unrolled form: no backtracking). It must
# match an unterminated string too: else every quote after the first starts one more scan to the end, which fails,
# and a body of `"` and 400,000 `\"` took an hour, holding the GIL all along.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


@dataclass(frozen=True)
class PayloadLimits:
    max_payload: int  # the NATS server's, from its INFO

    @property
    def job_bytes(self) -> int:
        return self.max_payload // 4

    @property
    def output_bytes(self) -> int:
        return self.max_payload // 2


def encoded_size(text: str) -> int:
    """Bytes `text` takes inside a JSON message (escapes included, quotes not)."""
    return len(_encode(text)) - 2


def too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON document `raw` opens arrays and objects more than `limit` levels deep.

    Strings are removed first (brackets inside them do not count); the depth is then the largest count
    of open brackets at any point, closed or not (a decoder recurses into every one it opens, so an
    unbalanced `[[[[...` is as deep as a balanced one).
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:  # the common case: nothing to scan
        return False
    brackets = np.frombuffer(_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1).astype(np.int32)
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit
