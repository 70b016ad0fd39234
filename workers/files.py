"""Files that another process may read while they are written: replaced whole, never rewritten in place.

A file rewritten in place (`Path.write_bytes`: truncate, then write) can be read empty or half-written by a process
looking at that moment: a rank's liveness file read by its node's agent every report, `serve.json` read by every
`conclave` command, a model's manifest cache read by a node serving its files. A temporary file beside it, renamed
over it, is seen whole or not at all (a rename within a folder is atomic on POSIX). Not durable, and not meant to
be: after a power cut the old file, an empty one or none may be there, and every reader of these treats a bad one
as absent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_whole(path: Path, data: bytes, mode: int = 0o644) -> None:
    """`path` holds `data`, a new file with `mode` (0o600 for what carries a secret); raises OSError as a write
    would, leaving nothing behind. The temporary file's name is unique to this call (two threads may write one
    file) and starts with a dot (listings of a model's files skip those)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
