"""Files that another process may read while they are written: replaced whole, never rewritten in place.

A file rewritten in place (`Path.write_bytes`: truncate, then write) can be read empty or half-written by a process
looking at that moment: a rank's liveness file read by its node's agent every report, `serve.json` read by every
`conclave` command, a model's manifest cache read by a node serving its files. A temporary file beside it, renamed
over it, is seen whole or not at all (a rename within a folder is atomic on POSIX).
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_whole(path: Path, data: bytes, mode: int = 0o644) -> None:
    """`path` holds `data`, made anew with `mode` (0o600 for what carries a secret); raises OSError as a write would."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)  # (a crashed writer's: O_CREAT would keep its mode)
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as file:
        file.write(data)
    os.replace(temporary, path)
