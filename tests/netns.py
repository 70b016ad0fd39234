"""Network namespaces in tests (ops/netns.py makes them)."""

from __future__ import annotations

import os

from ops.netns import Network, Node, namespace_support  # noqa: F401 (the tests' names for them)


def require_namespaces() -> None:
    """Skip when not root (a developer's machine); as root (CI) a test that needs namespaces must run, so a
    broken setup there fails instead of skipping."""
    import pytest

    reason = namespace_support()
    if reason is None:
        return
    if os.geteuid() != 0:
        pytest.skip(reason)
    pytest.fail(reason)
