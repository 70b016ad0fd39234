"""Small LANs of Linux network namespaces, for tests and `conclave bench --files --link-gbit`: N nodes, each a
namespace with one veth link onto a bridge, at 10.77.0.1, 10.77.0.2, ... /24, each link at a given rate if asked
(like a switch's ports: `tc`'s token bucket on both ends of the veth). Needs root (CAP_NET_ADMIN) and iproute2.

The bridge lives in a namespace of its own (the hub), so nothing is added to the host's namespace and
deleting the namespaces removes everything: a namespace's deletion destroys its veth ends, and a veth's
peer goes with it. Every name carries a random suffix, so parallel runs and the leftovers of a killed run
do not collide; interface names stay within Linux's 15 characters.

Multicast (mDNS) needs, in each node, the link up with an IPv4 address (zeroconf opens its sockets per
interface address: an interface without one is not used) and its MULTICAST flag (veths have it). zeroconf
also names the outgoing interface of each socket (IP_MULTICAST_IF), so its own traffic needs no route; a
socket that does not (a plain sendto 224.0.0.251) fails with ENETUNREACH in a namespace without a default
route, hence the route for 224.0.0.0/4 on the link. On the bridge, multicast snooping is off, so every group
is flooded to every port whatever IGMP reports were seen (224.0.0.x, mDNS's, is flooded anyway), and the
forward delay is 0 (STP is off too): a port forwards as soon as it is up.

    with Network(2) as net:
        a, b = net.nodes
        process = net.popen(a, sys.executable, "-c", "...")
        net.run(b, "ping", "-c1", a.address)
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.77.0"


def namespace_support() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN); run the tests as root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"cvprobe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def tc(*args: str) -> None:
    result = subprocess.run(["tc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class Node:
    namespace: str
    interface: str  # the node's end of its veth pair
    address: str  # IPv4, in SUBNET.0/24


@dataclass
class Network:
    """`count` nodes on one bridge; a context manager that makes them on entry and removes them on exit."""

    count: int
    rate: str | None = None  # each link's rate both ways, as `tc` writes it ("1gbit"); None: as fast as veths go
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[Node] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"conclave-{self.suffix}-hub"

    @property
    def bridge(self) -> str:
        return f"cvbr{self.suffix}"

    def __enter__(self) -> Network:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _make(self) -> None:
        if not 0 < self.count < 250:
            raise ValueError("1 to 249 nodes")
        self._add_namespace(self.hub)
        ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0",
           "mcast_snooping", "0")
        ip("-n", self.hub, "link", "set", self.bridge, "up")
        for i in range(self.count):
            node = Node(f"conclave-{self.suffix}-{i}", f"cv{self.suffix}n{i}", f"{SUBNET}.{i + 1}")
            port = f"cv{self.suffix}h{i}"
            self._add_namespace(node.namespace)
            # Both ends are made directly in their namespaces: nothing passes through the host's.
            ip("link", "add", node.interface, "netns", node.namespace, "type", "veth", "peer", "name", port,
               "netns", self.hub)
            ip("-n", self.hub, "link", "set", port, "master", self.bridge, "up")
            ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.interface)
            ip("-n", node.namespace, "link", "set", node.interface, "up")
            ip("-n", node.namespace, "route", "add", "224.0.0.0/4", "dev", node.interface)
            if self.rate is not None:  # what the node sends (its end) and receives (the hub's end)
                for namespace, interface in ((node.namespace, node.interface), (self.hub, port)):
                    tc("-n", namespace, "qdisc", "add", "dev", interface, "root", "tbf", "rate", self.rate, "burst",
                       "4mb", "latency", "100ms")
            self.nodes.append(node)

    def command(self, node: Node | str, *argv: str) -> list[str]:
        """`argv` as run inside `node`'s namespace."""
        return ["ip", "netns", "exec", node if isinstance(node, str) else node.namespace, *argv]

    def run(self, node: Node | str, *argv: str, **options) -> subprocess.CompletedProcess:
        """Run `argv` in `node` to its end (text output captured unless `options` say otherwise)."""
        options = {"capture_output": True, "text": True, **options}
        return subprocess.run(self.command(node, *argv), **options)

    def popen(self, node: Node | str, *argv: str, **options) -> subprocess.Popen:
        """Start `argv` in `node` (`ip netns exec` execs it: the Popen is the process itself); killed on close."""
        process = subprocess.Popen(self.command(node, *argv), **options)
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Kill what `popen` started, then delete the namespaces (which removes the links and the bridge).
        A namespace outlives its deletion while a process is still in it: hence the processes first."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self.processes.clear()
        errors = []
        for name in reversed(self._namespaces):
            result = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if result.returncode != 0:
                errors.append(f"{name}: {result.stderr.strip()}")
        self._namespaces.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))
