"""Finding a cluster on the LAN by mDNS (ops/discovery.py), between network namespaces on one bridge
(tests/netns.py): a node with no address finds the advertiser. Root only (CI runs as root: there it must run).

The advertiser and the browser are child processes inside their namespaces. The advertiser prints a line
once its name is probed and announced, and advertises until its stdin closes; the browser prints what it
found as JSON. No sleeps: the browse itself is the only wait.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from ops.discovery import Advert, DiscoveryError, choose_cluster, merge
from tests.netns import Network, require_namespaces

ROOT = Path(__file__).resolve().parents[1]
BROWSE_S = 1.5
CA = "ab" * 32

ADVERTISER = """
import asyncio, sys
import msgspec
from ops.discovery import Advert, advertise, advertise_async
advert = msgspec.json.decode(sys.argv[2], type=Advert)
if sys.argv[1] == "sync":
    with advertise(advert):
        print("ready", flush=True)
        sys.stdin.read()
else:
    async def main():
        async with await advertise_async(advert):
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.read)
    asyncio.run(main())
"""

BROWSER = """
import sys
import msgspec
from ops.discovery import browse
sys.stdout.buffer.write(msgspec.json.encode(browse(float(sys.argv[1]))))
"""


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def browse_in(net: Network, node) -> list[Advert]:
    result = net.run(node, *python(BROWSER, str(BROWSE_S)), text=False, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    return msgspec.json.decode(result.stdout, type=list[Advert])


def wait_for_line(process: subprocess.Popen, expected: str, timeout_s: float = 15.0) -> None:
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen = []
    try:
        while (line := lines.get(timeout=timeout_s)) is not None:
            if line.strip() == expected:
                return
            seen.append(line)
    except queue.Empty:
        raise AssertionError(f"no {expected!r} from the advertiser within {timeout_s:g}s: {''.join(seen)}") from None
    raise AssertionError(f"the advertiser exited before {expected!r}: {''.join(seen)}{process.stderr.read()}")


@pytest.mark.parametrize("flavour", ["async", "sync"])
def test_a_node_with_no_address_finds_the_cluster(flavour):
    require_namespaces()
    advert = Advert(name="lab", cluster_id="0123456789abcdef", port=4222, ca=CA, http_port=8000)
    with Network(2) as net:
        a, b = net.nodes
        advertiser = net.popen(a, *python(ADVERTISER, flavour, msgspec.json.encode(advert).decode()),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT)
        wait_for_line(advertiser, "ready")
        found = browse_in(net, b)
        advertiser.stdin.close()  # a clean goodbye; the harness kills it if it hangs
        assert advertiser.wait(10) == 0, advertiser.stderr.read()
    # Addresses: the advertiser's only non-loopback address, filled in from its interfaces.
    assert found == [msgspec.structs.replace(advert, addresses=(a.address,))]
    assert choose_cluster(found, token_ca=CA) == found[0]


def test_no_cluster_on_the_lan():
    require_namespaces()
    with Network(1) as net:
        found = browse_in(net, net.nodes[0])
    assert found == []
    with pytest.raises(DiscoveryError, match=r"no Conclave cluster answered .* within 1.5s; multicast may be "
                                             r"blocked: .*conclave join ADDRESS --token"):
        choose_cluster(found, waited_s=BROWSE_S)


def test_several_clusters_ask_which():
    one = Advert(name="lab", cluster_id="aa01", port=4222, addresses=("10.77.0.1",), ca="11" * 32)
    two = Advert(name="office", cluster_id="bb02", port=4333, addresses=("10.77.0.2",), ca="22" * 32)
    with pytest.raises(DiscoveryError) as several:
        choose_cluster([one, two])
    message = str(several.value)
    assert "several Conclave clusters" in message and "pass one's address" in message
    assert "lab (cluster aa01) at 10.77.0.1:4222" in message and "office (cluster bb02) at 10.77.0.2:4333" in message
    # A token names its cluster (by its CA): that one is picked, whatever else answers.
    assert choose_cluster([one, two], token_ca="22" * 32) == two
    assert choose_cluster([one, two], token_ca=("11" * 32).upper()) == one
    with pytest.raises(DiscoveryError, match="none is the token's") as other:
        choose_cluster([one, two], token_ca="33" * 32)
    assert "lab (cluster aa01)" in str(other.value)


def test_adverts_of_one_cluster_merge():
    first = Advert(name="lab", cluster_id="aa01", port=4222, addresses=("10.0.0.1",))
    again = Advert(name="lab (2)", cluster_id="aa01", port=4222, addresses=("10.0.0.1", "192.168.1.5"))
    assert merge([first, again]) == [msgspec.structs.replace(first, addresses=("10.0.0.1", "192.168.1.5"))]
    assert choose_cluster([first, again]).addresses == ("10.0.0.1", "192.168.1.5")
