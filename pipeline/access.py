"""Who may do what on NATS: one role per kind of process, each with its own nkey and the least it needs.

NATS accepts no anonymous connection. Every process proves a role with an nkey (an Ed25519 key pair: the
server's configuration holds only public keys, and a client signs the server's nonce, so no secret ever
crosses the wire). The roles:

- `operator`: `conclave serve` itself and the operator's commands (`conclave audit`, `credentials`). The
  only role that may create or change streams and consumers, or read the audit log.
- `ingress`: the HTTP front; a submitter named "ingress" (below), and it may read consumer state (to
  answer 429 by the expected wait) and the workers' status messages.
- `auditor`: the first machine's dashboard (ingress/audit.py): it reads the audit log and its checkpoints and
  hears each record as it is stored; it writes nothing. Only `conclave serve` makes its key, so no joined
  node's ingress reads the audit log.
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
import ssl
from dataclasses import dataclass
from pathlib import Path

from pipeline.subjects import (AUDIT_PREFIX, AUDIT_STREAM, CHECKPOINTS_STREAM, CONVERSATIONS_PREFIX, CONVERSATIONS_STREAM, CATALOGUE_PREFIX, CATALOGUE_STREAM, CANCELS_PREFIX, CONTROL_PREFIX, CONTROL_STREAM, INSTANCES_PREFIX, INSTANCES_STREAM, CANCELS_STREAM, DEAD_PREFIX, GROUPS_PREFIX, JOBS_PREFIX,
                               JOBS_STREAM, NODES_PREFIX, NODES_STREAM, RESULTS_PREFIX, RESULTS_STREAM, STATUS_PREFIX,
                               REPLIES_PREFIX, name_of_token, reply_prefix,
                               subject_token, worker_durable)

OPERATOR = "operator"
INGRESS = "ingress"
AUDITOR = "auditor"
UNAUTHENTICATED = "unauthenticated"  # the submitter of a job on a subject without one (sent before version 0.5)
# Submitters whose job's `caller` is believed: the ingress states which API key made an HTTP request, the
# operator's `conclave audit replay` which record it replays. Any other submitter's claim is kept as a claim.
ATTESTING_SUBMITTERS = frozenset({INGRESS, OPERATOR})
JOINER = "joiner"  # whoever holds the cluster's join token, before it is a node (ops/join.py)
# The CA certificate is public: a joining node fetches it before it trusts the broker, as this well-known user
# whose seed is in the code. It may ask for the certificate and nothing else, so a man in the middle that relays
# its signature gains nothing; the join token's own key is used only once the broker is verified (ops/join.py).
CA_READER = "ca-reader"
CA_READER_SEED = "SUAHCE3VMZUGMR56OFPRVX4P3GEBPDRP73DLTPP62DR2IYNHSTGFVC3BWQ"
_RESERVED = {OPERATOR, INGRESS, AUDITOR, UNAUTHENTICATED, JOINER, CA_READER}
_SUBMITTER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
NODE_ID = re.compile(r"[0-9a-f]{8,32}")  # ops/agent.py makes 12; hex only: no '-', no `ingress` or `worker`
# The subjects of cluster membership and of the controller's orders to node agents (ops/join.py, ops/controller.py, ops/ranks.py).
JOIN_SUBJECT = "conclave.cluster.join"
CA_SUBJECT = "conclave.cluster.ca"
PLACE_SUBJECT = "conclave.cluster.place"  # placement previews, answered by the first machine (ops/instances.py)
INSTANCES_SUBJECT = "conclave.cluster.instances"  # instances added and removed, answered by the first machine
AGENTS_PREFIX = "conclave.agents"
USERS_SUBJECT = "conclave.cluster.users"  # the users every broker admits, announced by the operator (ops/brokers.py)


class AccessError(ValueError):
    """A name or key that cannot be used; the message is for the operator."""


def worker_role(model: str) -> str:
    return f"worker-{subject_token(model)}"


def check_submitter_name(name: str) -> str:
    if not _SUBMITTER_NAME.fullmatch(name) or name in _RESERVED or name.startswith(("worker-", "node-")):
        raise AccessError(f"{name!r} cannot name a submitter: use 1 to 63 of a-z, 0-9, '_' and '-', starting with "
                          f"a letter or digit, and none of {sorted(_RESERVED)}, worker-* or node-*")
    return name


def inbox_prefix(role: str) -> str:
    """The role's own NATS inbox (replies to its requests, its pull subscriptions): under its reply prefix,
    so that no other role can subscribe to it (nats-py's default `_INBOX.>` is shared by everyone)."""
    return f"{reply_prefix(role)}._INBOX"


_INBOX = re.compile(rf"{re.escape(REPLIES_PREFIX)}\.[^.*>\s]+\._INBOX(\.[^.*>\s]+)+")


def is_inbox(subject: str | None) -> bool:
    """Whether `subject` lies in some role's own inbox (`inbox_prefix`). A request's reply subject is the asker's
    choice, and NATS checks no permission on it: the answer is published with the responder's rights, which are
    everything for the operator and any reply subject for an agent (`allow_responses`). So a responder that
    answered wherever it was told would write for the asker: the CA certificate over the controller lease, a
    ticket into the audit log. Every responder answers only into an inbox (pipeline/connection.py: `answer`):
    no stream or bucket stores anything under `conclave.replies.`, and an inbox other than the asker's own
    reaches no request waiting there (nats-py names each request's reply by a random token)."""
    return subject is not None and _INBOX.fullmatch(subject) is not None


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool = False  # may answer requests it received (nats-server's allow_responses)


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
    # Besides: the consumers' state (admission), the nodes' statuses, the instances and who holds the controller
    # lease (/v1/cluster, /v1/models), placement previews (/v1/cluster/placement) and instances added or removed
    # (/v1/cluster/instances); and each change of an instance and each node's status as it is written (its model
    # list at once, and the dashboard's live view: ingress/live.py).
    return Permissions(publish=(*own.publish, f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.*",
                                f"$JS.API.STREAM.INFO.{NODES_STREAM}", _direct_get(NODES_STREAM, f"{NODES_PREFIX}.>"),
                                f"$JS.API.STREAM.INFO.{INSTANCES_STREAM}",
                                _direct_get(INSTANCES_STREAM, f"{INSTANCES_PREFIX}.>"), PLACE_SUBJECT,
                                INSTANCES_SUBJECT,
                                _direct_get(CONTROL_STREAM, f"{CONTROL_PREFIX}.lease"),
                                # Responses API conversations (ingress/responses.py), shared by every ingress.
                                f"{CONVERSATIONS_PREFIX}.>", _direct_get(CONVERSATIONS_STREAM, f"{CONVERSATIONS_PREFIX}.>")),
                       subscribe=(*own.subscribe, f"{STATUS_PREFIX}.>", f"{INSTANCES_PREFIX}.>", f"{NODES_PREFIX}.>"))


def auditor_permissions() -> Permissions:
    return Permissions(publish=(f"$JS.API.STREAM.INFO.{AUDIT_STREAM}", f"$JS.API.STREAM.MSG.GET.{AUDIT_STREAM}",
                                f"$JS.API.STREAM.INFO.{CHECKPOINTS_STREAM}",
                                f"$JS.API.STREAM.MSG.GET.{CHECKPOINTS_STREAM}"),
                       subscribe=(f"{reply_prefix(AUDITOR)}.>", f"{AUDIT_PREFIX}.>"))


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


def ca_reader_permissions() -> Permissions:
    return Permissions(publish=(CA_SUBJECT,), subscribe=(f"{reply_prefix(CA_READER)}.>",))


def joiner_permissions() -> Permissions:
    """The join token's holder: it may fetch the CA certificate and ask to join, and hear the answers."""
    return Permissions(publish=(CA_SUBJECT, JOIN_SUBJECT), subscribe=(f"{reply_prefix(JOINER)}.>",))


def node_role(node_id: str) -> str:
    return f"node-{node_id}"


def agent_permissions(node_id: str) -> Permissions:
    """A node's agent: it reports its own status (only under its own key of the nodes bucket), takes the
    controller's orders for itself, and answers them (`allow_responses`: only to requests it received). It asks
    other nodes' agents for tickets to their model files, and answers theirs (ops/model_files.py). It writes and
    reads the catalogue's entries of its own store's models, only under its own keys (pipeline/catalogue.py)."""
    own_entries = f"{CATALOGUE_PREFIX}.*.{node_id}"
    return Permissions(publish=(f"{NODES_PREFIX}.{node_id}", f"{AGENTS_PREFIX}.{node_id}.events",
                                _direct_get(NODES_STREAM, f"{NODES_PREFIX}.{node_id}"), f"{AGENTS_PREFIX}.*.files",
                                own_entries, f"$JS.API.STREAM.INFO.{CATALOGUE_STREAM}",
                                _direct_get(CATALOGUE_STREAM, own_entries)),
                       subscribe=(f"{reply_prefix(node_role(node_id))}.>", f"{AGENTS_PREFIX}.{node_id}.orders.>",
                                  f"{AGENTS_PREFIX}.{node_id}.files"),
                       responses=True)


def controller_permissions(role: str) -> Permissions:
    """A broker node's controller, when it holds the lease (pipeline/lease.py): it reads the nodes, orders every
    agent and hears their reports, publishes the instances, and writes the lease (not the plan: the operator's).
    An instance removed from the plan is drained and its consumer deleted (ops/controller.py: retire): it reads
    and deletes the jobs stream's consumers. It reads the catalogue (a model's facts: pipeline/catalogue.py) and
    hears the plan as it is written. It also hears the users every broker admits (ops/brokers.py): only broker
    nodes have this role."""
    return Permissions(publish=(f"$JS.API.STREAM.INFO.{NODES_STREAM}", _direct_get(NODES_STREAM, f"{NODES_PREFIX}.>"),
                                f"$JS.API.STREAM.INFO.{CATALOGUE_STREAM}",
                                _direct_get(CATALOGUE_STREAM, f"{CATALOGUE_PREFIX}.>"),
                                f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.*", f"$JS.API.CONSUMER.DELETE.{JOBS_STREAM}.*",
                                f"{INSTANCES_PREFIX}.>", f"$JS.API.STREAM.INFO.{INSTANCES_STREAM}",
                                _direct_get(INSTANCES_STREAM, f"{INSTANCES_PREFIX}.>"), f"{AGENTS_PREFIX}.*.orders.>",
                                f"{CONTROL_PREFIX}.lease",
                                _direct_get(CONTROL_STREAM, f"{CONTROL_PREFIX}.>")),
                       subscribe=(f"{reply_prefix(role)}.>", f"{AGENTS_PREFIX}.*.events", USERS_SUBJECT,
                                  f"{CONTROL_PREFIX}.plan"))


def union(*permissions: Permissions) -> Permissions:
    return Permissions(publish=tuple(dict.fromkeys(s for p in permissions for s in p.publish)),
                       subscribe=tuple(dict.fromkeys(s for p in permissions for s in p.subscribe)))


def permissions_of(role: str, models: list[str] = ()) -> Permissions | None:
    """The role's permissions; None for the operator (everything). A joined node has three users: its agent
    (`node-<id>`), its ingress (`node-<id>-ingress`, an ingress's rights) and its worker ranks
    (`node-<id>-worker`: a worker's rights for each of `models`, the models this cluster serves); a broker node a
    fourth, its controller (`node-<id>-controller`)."""
    if role == OPERATOR:
        return None
    if role == INGRESS or (role.startswith("node-") and role.endswith("-ingress")):
        return ingress_permissions()
    if role.startswith("node-") and role.endswith("-controller"):
        return controller_permissions(role)
    if role.startswith("node-") and role.endswith("-worker"):
        return union(*(worker_permissions(model) for model in models)) if models else Permissions((), ())
    if role.startswith("node-"):
        return agent_permissions(role.removeprefix("node-"))
    if role == AUDITOR:
        return auditor_permissions()
    if role == JOINER:
        return joiner_permissions()
    if role == CA_READER:
        return ca_reader_permissions()
    if role.startswith("worker-"):
        return worker_permissions(name_of_token(role.removeprefix("worker-")))
    return submitter_permissions(role)


def authorization_block(public_keys: dict[str, str]) -> str:
    """nats-server's `authorization` block for these roles (role -> nkey public key). No user without a
    key exists, so an anonymous connection is refused."""
    models = sorted(name_of_token(role.removeprefix("worker-")) for role in public_keys if role.startswith("worker-"))
    users = []
    for role, key in sorted(public_keys.items()):
        permissions = permissions_of(role, models)
        entry = f"    # {role}\n    {{nkey: {key}"
        if permissions is not None:
            entry += (f", permissions: {{publish: {{allow: {json.dumps(list(permissions.publish) or ['_NONE_'])}}}, "
                      f"subscribe: {{allow: {json.dumps(list(permissions.subscribe) or ['_NONE_'])}}}"
                      + (", allow_responses: {max: 1, expires: \"30s\"}" if permissions.responses else "") + "}")
        users.append(entry + "}")
    return "authorization {\n  users: [\n" + ",\n".join(users) + "\n  ]\n}\n"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client's TLS context for a cluster's broker (ops/cluster_tls.py): the chain must lead to `ca_file`, the
    cluster's private CA; host names are not checked (a node may reach the broker by an address the certificate
    does not name, and only this cluster's CA signs what it accepts). With None it verifies nothing: only for
    fetching the CA certificate, whose hash the caller then compares with its join token."""
    # A bare context, not create_default_context(): that one also trusts the system's public CAs, and with host
    # names unchecked any publicly issued certificate would pass. Only the cluster's CA is loaded.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if ca_file is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(ca_file))
    return context


@dataclass(frozen=True)
class Identity:
    """What a process connects to NATS as: its role, the file holding its nkey seed, and, on a cluster's broker,
    the cluster CA it trusts (TLS from the first byte)."""

    role: str
    seed_file: Path
    ca_file: Path | None = None

    def connect_options(self) -> dict:
        options = {"nkeys_seed": str(self.seed_file), "inbox_prefix": inbox_prefix(self.role)}
        if self.ca_file is not None:
            options.update(tls=tls_context(self.ca_file), tls_handshake_first=True)
        return options
