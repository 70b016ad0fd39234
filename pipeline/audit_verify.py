"""Checking the audit log against its signed checkpoints: what `conclave audit verify` proves, and no more.

Pure (no network): it takes the log's entries (from the live stream or an export), the checkpoint messages
and, when known, the stream's own information, and returns a Verdict. docs/audit.md explains each finding
and the exit codes. An entry is vouched for only when a checkpoint signed by a trusted key covers it and
the chain over that checkpoint's whole span, recomputed from the entries, reaches the value it signed.
"""

from __future__ import annotations

import bisect
import datetime
import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.audit import NOT_A_RECORD, Entry, chain, decode_record, describe_age, legacy_problems
from pipeline.checkpoints import config_digest, read_signed, signature_ok
from pipeline.subjects import audit_subject
from schemas.audit import GENESIS, Checkpoint, StreamFacts

BROKEN, UNVOUCHED, NOTE = "BROKEN", "NOT VOUCHED FOR", "NOTE"
# Clock difference tolerated between the signer's clock and the server's retention, when telling entries
# that aged out from entries removed too early.
SLACK_S = 300.0
SHOWN = 20  # findings of one kind printed in full


@dataclass
class Finding:
    level: str
    text: str
    seq: int | None = None


@dataclass
class Verdict:
    entries: int = 0
    records: int = 0
    vouched: int = 0
    unvouched: int = 0
    checkpoints: int = 0  # trusted checkpoints (valid signature, pinned key if one is given)
    pinned: str | None = None
    signers: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    first_unvouched: Finding | None = None
    # The trusted checkpoint that reaches furthest. Nothing in a log (or export) cut before its last
    # checkpoints tells it from an older complete one: only a checkpoint kept elsewhere, or --expect-seq, does.
    last_checkpoint: Checkpoint | None = None
    expected_seq: int | None = None

    def add(self, level: str, text: str, seq: int | None = None) -> None:
        self.findings.append(Finding(level, text, seq))

    def expect_seq(self, seq: int) -> None:
        """BROKEN unless a trusted checkpoint reaches `seq` (the auditor knows the log went at least that far)."""
        self.expected_seq = seq
        reached = self.last_checkpoint.to_seq if self.last_checkpoint is not None else 0
        if reached < seq:
            self.add(BROKEN, f"expected the log to reach seq {seq}, but its last trusted checkpoint ends at seq "
                             f"{reached}: entries and checkpoints were cut off its end, or this is an older copy",
                     reached + 1)

    @property
    def broken(self) -> bool:
        return any(f.level == BROKEN for f in self.findings)

    @property
    def exit_code(self) -> int:
        """1: broken; 0: every entry vouched for by checkpoints of the pinned key; 3: otherwise."""
        if self.broken:
            return 1
        return 0 if self.unvouched == 0 and self.checkpoints and self.pinned else 3

    def lines(self) -> list[str]:
        out = [f"{self.entries} entries ({self.records} audit records); {self.checkpoints} trusted checkpoints"
               + (f", signed by {', '.join(self.signers)}" if self.signers else "")
               + (" (pinned)" if self.pinned and self.signers else ""),
               f"vouched for: {self.vouched} of {self.entries} entries", self.last_checkpoint_line()]
        for level in (BROKEN, UNVOUCHED, NOTE):
            found = [f for f in self.findings if f.level == level]
            out += [f"{level}: {f.text}" for f in found[:SHOWN]]
            if len(found) > SHOWN:
                out.append(f"{level}: ... and {len(found) - SHOWN} more")
        if self.first_unvouched is not None:
            out.append(f"first entry not vouched for: {self.first_unvouched.text}")
        if self.broken:
            out.append("result: BROKEN (see above)")
        elif self.exit_code == 0:
            out.append(f"result: all {self.entries} entries are vouched for by checkpoints signed with the pinned "
                       f"key")
        else:
            why = f"{self.unvouched} of {self.entries} entries are not vouched for" if self.unvouched else \
                "no checkpoint signed by a pinned key vouches for the log"
            out.append(f"result: nothing found wrong, but {why}; this proves nothing about them")
        return out

    def last_checkpoint_line(self) -> str:
        cp = self.last_checkpoint
        if cp is None:
            return "last checkpoint: none trusted"
        line = f"last checkpoint: ends at seq {cp.to_seq}, signed {iso(cp.time)}, chain value {cp.chain_after}"
        if self.expected_seq is None:
            line += (" (compare it with a checkpoint you kept, or pass --expect-seq: a log cut before its last "
                     "checkpoints looks like an older complete one)")
        return line


def iso(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).isoformat(timespec="seconds")


def config_change(old: dict, new: dict) -> str:
    changed = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed if old.get(k) != new.get(k))


def verify_log(entries: list[Entry], checkpoint_messages: list[bytes], stream: StreamFacts | None, *,
               stream_missing: bool = False, pinned: str | None = None, now: float | None = None) -> Verdict:
    """Check `entries` (any order) against the signed checkpoints. `stream`: the audit stream's information
    (None when not known, as in an export without it); `stream_missing`: it is known not to exist."""
    return _Check(entries, stream, stream_missing, pinned, now).run(checkpoint_messages)


class _Check:
    def __init__(self, entries, stream, stream_missing, pinned, now):
        self.v = Verdict(pinned=pinned)
        self.entries = sorted(entries, key=lambda e: e.seq)
        self.seqs = [e.seq for e in self.entries]
        self.stream, self.stream_missing, self.pinned = stream, stream_missing, pinned
        self.now = now if now is not None else stream.time if stream is not None else time.time()
        self.source = "stream" if stream is not None else "export"
        if stream is not None:  # an empty stream reports first_seq = last_seq + 1 (or 0, 0 if never used)
            self.first = stream.first_seq if stream.messages else stream.last_seq + 1
            self.last = stream.last_seq
        else:
            self.first, self.last = (self.seqs[0], self.seqs[-1]) if self.seqs else (1, 0)
        self.vouched: list[tuple[int, int]] = []
        self.failed: list[tuple[int, int, str]] = []  # spans not vouched for, and why
        self.trusted: list[tuple[int, Checkpoint]] = []

    def run(self, checkpoint_messages: list[bytes]) -> Verdict:
        v = self.v
        for a, b in zip(self.seqs, self.seqs[1:]):
            if a == b:
                v.add(BROKEN, f"seq {a} appears twice", a)
        self.read_checkpoints(checkpoint_messages)
        by_signer: dict[str, list[tuple[int, Checkpoint]]] = {}
        for index, cp in self.trusted:
            by_signer.setdefault(cp.signer, []).append((index, cp))
        for cps in by_signer.values():
            previous = None
            for index, cp in cps:
                self.check_sequence(previous, index, cp)
                self.check_span(index, cp)
                previous = (index, cp)
            self.check_stream(*previous)
        for seq, text in legacy_problems(self.entries):
            v.add(BROKEN, text, seq)
        self.classify_entries()
        return v

    def read_checkpoints(self, messages: list[bytes]) -> None:
        ignored: Counter = Counter()
        for index, message in enumerate(messages, 1):
            try:
                signed = read_signed(message)
            except ValueError as exc:
                self.v.add(NOTE, f"checkpoint message {index} is not a checkpoint ({exc})")
                continue
            cp = signed.checkpoint
            if not signature_ok(signed):
                self.v.add(BROKEN, f"checkpoint {index} (seq {cp.from_seq}..{cp.to_seq}) does not carry a valid "
                                   f"signature of the key it names ({cp.signer}): forged or altered", cp.from_seq)
            elif self.pinned and cp.signer != self.pinned:
                ignored[cp.signer] += 1
            else:
                self.trusted.append((index, cp))
                if cp.signer not in self.v.signers:
                    self.v.signers.append(cp.signer)
        self.v.checkpoints = len(self.trusted)
        self.v.last_checkpoint = max((cp for _, cp in self.trusted), key=lambda cp: (cp.to_seq, cp.time), default=None)
        for signer, count in ignored.items():
            self.v.add(NOTE, f"{count} checkpoints signed by {signer}, not the pinned key: not trusted")
        if self.trusted and not self.pinned:
            self.v.add(NOTE, f"the signing key is not pinned: pass --public-key with your deployment's key "
                             f"(`conclave audit key`) to know who signed ({', '.join(self.v.signers)})")
        if not messages:
            self.v.add(NOTE, "there are no signed checkpoints: nothing vouches for any entry")

    def check_sequence(self, previous, index: int, cp: Checkpoint) -> None:
        label = f"checkpoint {index}"
        if cp.new_segment and cp.chain_before != GENESIS:
            self.v.add(BROKEN, f"{label} starts a segment but not from GENESIS", cp.from_seq)
        if previous is None:
            if not cp.new_segment:
                self.v.add(BROKEN, f"{label} (seq {cp.from_seq}..) continues a checkpoint of its key that is "
                                   f"missing", cp.from_seq)
            return
        p_index, prev = previous
        if cp.stream_created != prev.stream_created:
            self.v.add(BROKEN, f"the audit stream was deleted and made again between checkpoints {p_index} and "
                               f"{index} (created {prev.stream_created}, then {cp.stream_created})", cp.from_seq)
        elif cp.config_digest != prev.config_digest:
            self.v.add(BROKEN, f"the audit stream's configuration changed between checkpoints {p_index} and {index}: "
                               f"{config_change(prev.config, cp.config)}", cp.from_seq)
        if not cp.new_segment and (cp.from_seq != prev.to_seq + 1 or cp.chain_before != prev.chain_after):
            self.v.add(BROKEN, f"{label} does not continue checkpoint {p_index}: a checkpoint is missing or was "
                               f"altered", cp.from_seq)
        elif cp.new_segment and cp.stream_created == prev.stream_created and cp.from_seq > prev.to_seq + 1:
            self.gone(prev.to_seq + 1, cp.from_seq - 1, cp.config, f"before {label} (never signed)")

    def check_span(self, index: int, cp: Checkpoint) -> None:
        lo, hi = cp.from_seq, cp.to_seq
        label = f"checkpoint {index} (seq {lo}..{hi}, signed {iso(cp.time)})"
        start, end = bisect.bisect_left(self.seqs, lo), bisect.bisect_right(self.seqs, hi)
        present = self.entries[start:end]
        if hi > self.last:
            cut = max(lo, self.last + 1)
            self.v.add(BROKEN, f"{label} covers entries up to seq {hi}, but the {self.source} ends at seq "
                               f"{self.last}: seq {cut}..{hi} were cut off its end", cut)
            self.failed.append((lo, hi, f"{label} covers entries that are missing from the {self.source}"))
        elif lo < self.first:
            gone_hi = min(hi, self.first - 1)
            self.gone(lo, gone_hi, cp.config, f"covered by {label}")
            self.failed.append((lo, hi, f"{label} also covers seq {lo}..{gone_hi}, which are gone, so it cannot "
                                        f"vouch for the rest of its span"))
        elif len(present) != cp.count:
            have = {e.seq for e in present}
            missing = next((s for s in range(lo, hi + 1) if s not in have), None)
            what = f"seq {missing} is missing" if len(present) < cp.count and missing is not None else "entries differ"
            self.v.add(BROKEN, f"{label} covers {cp.count} entries, the {self.source} has {len(present)} there: "
                               f"{what}", missing if missing is not None else lo)
            self.failed.append((lo, hi, f"{label} covers {cp.count} entries and {len(present)} are here"))
        elif chain(cp.chain_before, (e.data for e in present)) != cp.chain_after:
            self.v.add(BROKEN, f"seq {lo}..{hi} do not match {label}: an entry was edited, replaced, inserted or "
                               f"reordered (however the hashes after it were recomputed)", lo)
            self.failed.append((lo, hi, f"an entry in seq {lo}..{hi} differs from what {label} signed"))
        else:
            self.vouched.append((lo, hi))

    def gone(self, lo: int, hi: int, config: dict, where: str) -> None:
        """Entries lo..hi no longer exist: aged out as the signed configuration allows, or removed."""
        max_age = float(config.get("max_age_s") or 0)
        limited = any((config.get(k) or 0) > 0 for k in ("max_msgs", "max_bytes", "max_msgs_per_subject"))
        if limited:
            self.v.add(NOTE, f"seq {lo}..{hi} ({where}) are gone: the stream's size limits drop old entries")
        elif not max_age:
            self.v.add(BROKEN, f"seq {lo}..{hi} ({where}) are gone, though the stream's signed configuration keeps "
                               f"entries forever: removed", lo)
        else:
            after = [cp.time for _, cp in self.trusted if cp.last_seq < hi]
            if after and self.now < max(after) + max_age - SLACK_S:
                self.v.add(BROKEN, f"seq {lo}..{hi} ({where}) are gone, though seq {hi} was appended after "
                                   f"{iso(max(after))} and the stream keeps entries for {describe_age(max_age)}: "
                                   f"removed before they could age out", lo)
            else:
                self.v.add(NOTE, f"seq {lo}..{hi} ({where}) aged out (retention {describe_age(max_age)})")

    def check_stream(self, index: int, cp: Checkpoint) -> None:
        label = f"checkpoint {index} (signed {iso(cp.time)})"
        stream = self.stream
        if self.stream_missing:
            self.v.add(BROKEN, f"the audit stream does not exist, but {label} says it held entries up to seq "
                               f"{cp.to_seq}: it was deleted")
        elif stream is None:
            return
        elif stream.created != cp.stream_created:
            self.v.add(BROKEN, f"the audit stream was deleted and made again after {label} (created "
                               f"{cp.stream_created}, now {stream.created})")
        elif config_digest(stream.config) != cp.config_digest:
            self.v.add(BROKEN, f"the audit stream's configuration changed since {label}: "
                               f"{config_change(cp.config, stream.config)}")
        elif stream.messages and stream.first_seq < cp.first_seq:
            self.v.add(BROKEN, f"the audit stream now starts at seq {stream.first_seq}, before {label}'s "
                               f"{cp.first_seq}: it was replaced")

    def classify_entries(self) -> None:
        v = self.v
        vouched = merge(self.vouched)
        starts = [lo for lo, _ in vouched]
        failed = sorted(self.failed)
        failed_starts = [lo for lo, _, _ in failed]
        last_signed = max((cp.to_seq for _, cp in self.trusted), default=0)
        messages: set[tuple[str, int]] = set()  # (model, job_seq): the job messages that have their record
        for entry in self.entries:
            try:
                record = decode_record(entry.data)
            except NOT_A_RECORD:
                record = None
            v.records += record is not None
            at = bisect.bisect_right(starts, entry.seq) - 1
            covered = at >= 0 and vouched[at][1] >= entry.seq
            misplaced = record is not None and misplaced_record(entry, record, messages)
            if covered and record is not None and not misplaced:
                v.vouched += 1
                continue
            if record is None:
                why = f"not an audit record (a foreign message on {entry.subject or 'an unknown subject'})"
                v.add(UNVOUCHED, f"seq {entry.seq}: {why}", entry.seq)
            elif misplaced:
                why = misplaced
                v.add(UNVOUCHED, f"seq {entry.seq}: {why}", entry.seq)
            elif (reason := self.failure_of(entry.seq, failed, failed_starts)) is not None:
                why = reason
            elif not self.trusted:
                why = "no checkpoint signed by " + ("the pinned key" if self.pinned else "any key")
            elif entry.seq > last_signed:
                why = f"appended after the last checkpoint (which ends at seq {last_signed})"
            else:
                why = "no checkpoint covers it"
            v.unvouched += 1
            if v.first_unvouched is None:
                job = f" (job {record.job_id})" if record is not None else ""
                v.first_unvouched = Finding(UNVOUCHED, f"seq {entry.seq}{job}: {why}", entry.seq)
        v.entries = len(self.entries)

    @staticmethod
    def failure_of(seq: int, failed: list, starts: list[int]) -> str | None:
        for lo, hi, reason in failed[:bisect.bisect_right(starts, seq)][::-1]:
            if lo <= seq <= hi:
                return reason
        return None


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged



def misplaced_record(entry: Entry, record, messages: set[tuple[str, int]]) -> str | None:
    """Why a record is not where a worker writes it, or None. A worker writes a job message's one record on the
    subject that names its model, submitter, job and message (pipeline/subjects.py: audit_subject), and its
    permission covers every subject of its model: a checkpoint signs whatever is there, so a record that names
    another model, submitter or job than its subject, or a second one for a message, is another hand's, and not
    vouched for. Legacy records (before 0.5) and entries of an unknown subject are not judged by it."""
    if record.hash is not None or not entry.subject:
        return None
    expected = audit_subject(record.model, record.submitter, record.job_id, record.job_seq)
    if entry.subject != expected:
        return (f"a record on {entry.subject} that names {expected} (model {record.model!r}, submitter "
                f"{record.submitter!r}, job {record.job_id!r}): not where its worker writes it")
    if record.job_seq:
        if (record.model, record.job_seq) in messages:
            return f"a second record for job message {record.job_seq} of {record.model!r}"
        messages.add((record.model, record.job_seq))
    return None
