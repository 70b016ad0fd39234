"""Stop-sequence matching on streamed text."""

from __future__ import annotations


class StopMatcher:
    """Cuts streamed text at the first stop sequence, which is not returned.

    Text that might be the start of a stop sequence is held back until the next piece shows
    whether it is one, so a stop sequence split across tokens is still caught and never sent.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None  # the stop sequence reached (the first in the text; the longest there)

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop sequence was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(i, -len(s), s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            at, _, self.matched = min(hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """At the end of generation the held-back text was not a stop sequence after all."""
        out, self.pending = self.pending, ""
        return out
