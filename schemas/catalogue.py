"""Model files as nodes exchange them (ops/model_files.py): a model's manifest, and the ticket that lets one node read
another's store. Declared once, checked where they arrive: a manifest comes from another machine, and its names
become file names here.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from msgspec import Meta, Struct

# A file of a model directory as it is stored: no folder, no leading dot (so never "." or ".."), nothing a shell or
# a URL would read differently, and not the name of a file on its way (ops/model_files.py: `<name>.partial`).
FILE_NAME = re.compile(r"^(?!.*\.partial$)[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
FileName = Annotated[str, Meta(pattern=FILE_NAME.pattern)]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]


class ModelFile(Struct, kw_only=True, forbid_unknown_fields=True):
    name: FileName
    size: Annotated[int, Meta(ge=0)]
    sha256: Sha256


class ModelManifest(Struct, kw_only=True, forbid_unknown_fields=True):
    """Every file of a model, as the node that serves it has it."""

    model: str
    files: list[ModelFile]
    # workers/store.py: model_revision of the whole model, kept by a node that fetches a part
    revision: Annotated[str, Meta(pattern=r"^[0-9a-f]{0,64}$")] = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class TicketAsk(Struct, kw_only=True, forbid_unknown_fields=True):
    """Asked of a node's agent on `conclave.agents.<id>.files` by another node's agent: may it read `model`?"""

    model: str


class Ticket(Struct, kw_only=True):
    """The answer: where the node's file port is, its TLS certificate (PEM: the receiver trusts only it), and a
    bearer token for it, for one model, for `ttl_s` seconds; or why not."""

    url: str = ""
    certificate: str = ""
    token: str = ""
    ttl_s: float = 0.0
    error: str = ""


class FileProgress(Struct, kw_only=True):
    """A file on its way to a node (several arrive at once): its bytes there, of `total`."""

    name: str
    done: int = 0
    total: int = 0


class FetchProgress(Struct, kw_only=True):
    """A model a node is fetching (or failed to fetch), in its status (`/v1/cluster`, `conclave nodes`)."""

    model: str
    order: str = ""  # the controller's order it follows (ops/controller.py judges only its own)
    done: int = 0  # bytes here, of `total`
    total: int = 0
    source: str = ""  # the node it fetches from
    bytes_per_s: Union[float, None] = None
    error: str = ""  # why the last try failed (it is tried again when the controller orders it again)
    files: list[FileProgress] = []  # the files on their way now, which share `bytes_per_s`


class ClusterModel(Struct, kw_only=True):
    """A model of the cluster's catalogue: on some node's disk, or running (pipeline/nodes.py: cluster_models); in
    `GET /v1/models` (beside OpenAI's fields) and `conclave models list`."""

    id: str
    # loaded: its instance serves; loading: placed or being placed, its ranks starting; unloading: draining, then
    # stopped; idle: its files are in the cluster, nothing runs it (a request for it loads it)
    status: Literal["loaded", "loading", "unloading", "idle"]
    files_on: list[str] = []  # nodes whose store holds it whole
    nodes: list[str] = []  # where its ranks run, rank 0 first
    created: int = 0  # unix seconds it entered a store (0: not known where no instance says)
    context_length: Union[int, None] = None
