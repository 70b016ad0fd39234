"""Nothing leaves the building: `conclave serve` installs nothing and reaches nothing at run time. Run in a
network namespace that has only a loopback interface (no route anywhere, no DNS), a fresh home imports the
bundled model and answers a request."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

INSIDE = textwrap.dedent('''
    import socket, sys
    from pathlib import Path

    import openai

    from ops.spawn import spawn_server

    print("INTERFACES", sorted(name for _, name in socket.if_nameindex()), flush=True)
    srv = spawn_server(Path(sys.argv[1]))
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        print("ANSWER", reply.choices[0].message.content, flush=True)
    finally:
        print("STOPPED", srv.stop(), flush=True)
''')


def test_a_fresh_home_serves_in_a_network_namespace_with_only_loopback(tmp_path):
    script = tmp_path / "inside.py"
    script.write_text(INSIDE)
    # CI runs as root; elsewhere a user namespace grants the network namespace.
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    command = f"ip link set lo up && exec {sys.executable} {script} {tmp_path / 'home'}"
    result = subprocess.run([*unshare, "sh", "-c", command], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    out = result.stdout + result.stderr
    assert "INTERFACES ['lo']" in out, out
    assert "ANSWER" in out and "Paris" in out.split("ANSWER", 1)[1], out
    assert "STOPPED 0" in out, out
