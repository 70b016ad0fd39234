"""Who may do what on NATS: one role per kind of process, each with its own nkey and the least it needs.

NATS accepts no anonymous connection. Every process proves a role with an nkey (an Ed25519 key pair: the
server's configuration holds only public keys, and a client signs the server's nonce, so no secret ever
crosses the wire). The roles:

- `operator`: `conclave serve` itself and the operator's commands (`conclave audit`, `credentials`). The
  only role that may create or change streams and consumers, or read the audit log.
- `ingress`: the HTTP front; a submitter named "ingress" (below), and it may read consumer state (to
  answer 429 by the expected wait) and the workers' status messages.
- `worker-<model>`: every rank of the model's worker group. It may take its model's jobs from its own
  consumer, ack them, publish events to submitters' reply subjects, store results and audit records of
  its model, and nothing else: it cannot read the audit log or another model's jobs, nor change a stream.
- a submitter `<name>` (an internal system; `conclave credentials issue NAME`): it may publish jobs on
  `conclave.jobs.<model>.<name>`, cancel its own jobs, read its own stored results and receive under
  `conclave.replies.<name>.` (its job events and its NATS inbox). Since it can publish on no other job
  subject, the subject a job arrives on says who sent it (pipeline/subjects.py: `parse_job_subject`), and
  since it can read under no other prefix, no submitter sees another's answers.

The permission lists below are the single source for the embedded nats-server and for the configuration
printed for an existing server (`conclave credentials server-config`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.subjects import (AUDIT_PREFIX, CANCELS_PREFIX, CANCELS_STREAM, DEAD_PREFIX, GROUPS_PREFIX, JOBS_PREFIX,
                               JOBS_STREAM, NODES_PREFIX, NODES_STREAM, RESULTS_PREFIX, RESULTS_STREAM, STATUS_PREFIX,
                               name_of_token, reply_prefix,
                               subject_token, worker_durable)

OPERATOR = "operator"
INGRESS = "ingress"
UNAUTHENTICATED = "unauthenticated"  # the submitter of a job on a subject without one (sent before version 0.5)
# Submitters whose job's `caller` is believed: the ingress states which API key made an HTTP request, the
# operator's `conclave audit replay` which record it replays. Any other submitter's claim is kept as a claim.
ATTESTING_SUBMITTERS = frozenset({INGRESS, OPERATOR})
_RESERVED = {OPERATOR, INGRESS, UNAUTHENTICATED}
_SUBMITTER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class AccessError(ValueError):
    """A name or key that cannot be used; the message is for the operator."""


def worker_role(model: str) -> str:
    return f"worker-{subject_token(model)}"


def check_submitter_name(name: str) -> str:
    if not _SUBMITTER_NAME.fullmatch(name) or name in _RESERVED or name.startswith("worker-"):
        raise AccessError(f"{name!r} cannot name a submitter: use 1 to 63 of a-z, 0-9, '_' and '-', starting with "
                          f"a letter or digit, and none of {sorted(_RESERVED)} or worker-*")
    return name


def inbox_prefix(role: str) -> str:
    """The role's own NATS inbox (replies to its requests, its pull subscriptions): under its reply prefix,
    so that no other role can subscribe to it (nats-py's default `_INBOX.>` is shared by everyone)."""
    return f"{reply_prefix(role)}._INBOX"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def _direct_get(stream: str, subjects: str) -> str:
    # The "last message on a subject" form of JetStream's direct get names the subject in the request
    # subject itself, so a permission can limit which stored messages a role may read.
    return f"$JS.API.DIRECT.GET.{stream}.{subjects}"


def submitter_permissions(name: str) -> Permissions:
    return Permissions(
        publish=(f"{JOBS_PREFIX}.*.{name}", f"{CANCELS_PREFIX}.{name}.>",
                 _direct_get(RESULTS_STREAM, f"{RESULTS_PREFIX}.*.{name}.>")),
        subscribe=(f"{reply_prefix(name)}.>",),
    )


def ingress_permissions() -> Permissions:
    own = submitter_permissions(INGRESS)
    # Besides: the consumers' state (admission), and the nodes' statuses (/v1/cluster).
    return Permissions(publish=(*own.publish, f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.*",
                                f"$JS.API.STREAM.INFO.{NODES_STREAM}", _direct_get(NODES_STREAM, f"{NODES_PREFIX}.>")),
                       subscribe=(*own.subscribe, f"{STATUS_PREFIX}.>"))


def worker_permissions(model: str) -> Permissions:
    token, consumer = subject_token(model), worker_durable(model)
    return Permissions(
        publish=(f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.{consumer}", f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{consumer}",
                 f"$JS.ACK.{JOBS_STREAM}.{consumer}.>", _direct_get(RESULTS_STREAM, f"{RESULTS_PREFIX}.{token}.>"),
                 _direct_get(CANCELS_STREAM, f"{CANCELS_PREFIX}.>"), f"{RESULTS_PREFIX}.{token}.>",
                 f"{AUDIT_PREFIX}.{token}.>", f"{DEAD_PREFIX}.{token}", f"{STATUS_PREFIX}.{token}",
                 "conclave.replies.>", f"{GROUPS_PREFIX}.{token}.>"),
        subscribe=(f"{reply_prefix(worker_role(model))}.>", f"{CANCELS_PREFIX}.>", f"{GROUPS_PREFIX}.{token}.>"),
    )


def permissions_of(role: str) -> Permissions | None:
    """The role's permissions; None for the operator (everything)."""
    if role == OPERATOR:
        return None
    if role == INGRESS:
        return ingress_permissions()
    if role.startswith("worker-"):
        return worker_permissions(name_of_token(role.removeprefix("worker-")))
    return submitter_permissions(role)


def authorization_block(public_keys: dict[str, str]) -> str:
    """nats-server's `authorization` block for these roles (role -> nkey public key). No user without a
    key exists, so an anonymous connection is refused."""
    users = []
    for role, key in sorted(public_keys.items()):
        permissions = permissions_of(role)
        entry = f"    # {role}\n    {{nkey: {key}"
        if permissions is not None:
            entry += (f", permissions: {{publish: {{allow: {json.dumps(list(permissions.publish))}}}, "
                      f"subscribe: {{allow: {json.dumps(list(permissions.subscribe))}}}}}")
        users.append(entry + "}")
    return "authorization {\n  users: [\n" + ",\n".join(users) + "\n  ]\n}\n"


@dataclass(frozen=True)
class Identity:
    """What a process connects to NATS as: its role and the file holding the role's nkey seed."""

    role: str
    seed_file: Path

    def connect_options(self) -> dict:
        return {"nkeys_seed": str(self.seed_file), "inbox_prefix": inbox_prefix(self.role)}
