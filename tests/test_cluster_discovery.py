"""Joining without an address, between machines that only share a LAN: two network namespaces on a bridge
(tests/netns.py), the first running `conclave serve --cluster` at 10.77.0.1, the second `conclave join` with
a token and nothing else. Root only; CI runs as root, and there it must run.

The joining node finds the cluster by mDNS, checks its CA against the token and joins; a token of another
cluster finds nothing to join; a token whose key is not the cluster's is refused by the broker; a second
machine presenting the first's node id is refused with its message.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ops.agent import node_id
from ops.credentials import new_seed
from ops.spawn import spawn_node, spawn_server
from tests.netns import Network, require_namespaces


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    require_namespaces()
    with Network(2) as net:
        first, second = net.nodes
        server = spawn_server(tmp_path_factory.mktemp("lan-first"), "--cluster", "--advertise", first.address,
                              "--cluster-name", "lab", prefix=net.command(first))
        net.processes.append(server.process)  # killed with the network if the test fails
        token = next(line.split("--token ")[1].strip() for line in server.output if "--token " in line)
        yield net, server, token, second
        server.stop()


def join(net, node, home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(net.command(node, sys.executable, "-m", "ops.cli", "--home", str(home), "join", *args),
                          capture_output=True, text=True, timeout=90)


def test_a_node_with_no_address_finds_the_cluster_by_mdns_and_joins(lan, tmp_path):
    net, server, token, second = lan
    node = spawn_node(tmp_path / "second", "--token", token, prefix=net.command(second))
    try:
        output = "".join(node.output)
        assert "found cluster lab" in output and "10.77.0.1" in output, output
        assert f"Conclave node {node_id(tmp_path / 'second')} is serving in cluster lab" in output, output
        assert (tmp_path / "second" / "cluster.json").exists()
    finally:
        node.stop()
    # The same id from another machine (a copied node-id, with keys of its own) is refused, and says how to fix it.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "second" / "node-id", copy / "node-id")
    refused = join(net, second, copy, "--token", token)
    assert refused.returncode == 1, refused.stderr
    assert "already belongs to a member" in refused.stderr and "remove <home>/node-id" in refused.stderr


def test_without_the_clusters_token_nothing_joins(lan, tmp_path):
    net, server, token, second = lan
    _, fingerprint, _ = token.split(".")
    wrong_key = join(net, second, tmp_path / "a", "--token", f"cj1.{fingerprint}.{new_seed().decode()}")
    assert wrong_key.returncode == 1 and "refused the token" in wrong_key.stderr, wrong_key.stderr
    other_cluster = join(net, second, tmp_path / "b", "--token", f"cj1.{'1' * 64}.{new_seed().decode()}")
    assert other_cluster.returncode == 1 and "none is the token's" in other_cluster.stderr, other_cluster.stderr
    no_token = join(net, second, tmp_path / "c")
    assert no_token.returncode == 1 and "not a member of a cluster yet" in no_token.stderr
    assert not any((tmp_path / name / "cluster.json").exists() for name in "abc")
