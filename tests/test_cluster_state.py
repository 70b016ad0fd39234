"""The cluster's state kept in NATS key-value buckets (pipeline/lease.py, pipeline/nodes.py), against a real
nats-server: what a value that no version of Conclave wrote, or one too large, does to the readers."""

from __future__ import annotations


async def test_a_plan_that_is_not_json_is_written_over_by_the_first_machine_not_fatal(bare_nats):
    # The plan's key may hold bytes no version wrote (a broker's disk, a bug, anything written there): the first
    # machine's `serve` must still start and write its plan, and readers see no plan meanwhile instead of raising.
    from ops.serve import serve_plan
    from pipeline.lease import PLAN_SUBJECT, read_plan
    from pipeline.subjects import CONTROL_STREAM
    from schemas.cluster import PlacementRequest
    from schemas.membership import InstancePlan, WorkerSettings

    _, nc = bare_nats
    js = nc.jetstream()
    await js.publish(PLAN_SUBJECT, b"-----BEGIN CERTIFICATE-----\nMIIB", stream=CONTROL_STREAM)
    assert await read_plan(js) is None
    served = InstancePlan(model="acme/tiny", settings=WorkerSettings(), request=PlacementRequest())
    await serve_plan(js, served)
    assert (await read_plan(js)).served == served


async def test_a_node_status_is_bounded_in_size_in_a_bucket_made_before_the_bound_too(bare_nats):
    # Every node writes its status each second and every reader decodes them all on its event loop: a node that
    # wrote megabytes there would stall the controller and every ingress.
    import dataclasses

    import pytest
    from nats.js.errors import APIError

    from pipeline.nodes import NODE_STATUS_MAX, node_subject, nodes_bucket_config
    from pipeline.streams import ensure_streams
    from pipeline.subjects import NODES_STREAM

    _, nc = bare_nats
    js = nc.jetstream()
    await js.delete_stream(NODES_STREAM)  # as an earlier version made it: no bound
    await js.create_key_value(dataclasses.replace(nodes_bucket_config(), max_value_size=None))
    await js.publish(node_subject("0123456789ab"), b"x" * (NODE_STATUS_MAX + 1), stream=NODES_STREAM)
    await ensure_streams(js)
    assert (await js.stream_info(NODES_STREAM)).config.max_msg_size == NODE_STATUS_MAX
    with pytest.raises(APIError, match="maximum"):
        await js.publish(node_subject("0123456789ab"), b"x" * (NODE_STATUS_MAX + 1), stream=NODES_STREAM)
    await js.publish(node_subject("0123456789ab"), b"x" * 4096, stream=NODES_STREAM)



async def test_a_reader_whose_clock_is_an_hour_off_the_brokers_sees_a_reporting_node_up(bare_nats, monkeypatch):
    # The nodes bucket is stamped by the broker's clock; a reader on another machine (a joined node's ingress, a
    # controller on a broker node) must not judge those stamps by its own clock.
    import time
    from types import SimpleNamespace

    from pipeline import nodes
    from schemas.cluster import NodeFacts, NodeStatus

    _, nc = bare_nats
    facts = NodeFacts(id="0123456789ab", host="h", memory_total=8 * 10**9, memory_available=4 * 10**9)
    await nodes.put_status(nc.jetstream(), NodeStatus(facts=facts, memory_used=0, time=time.time()))
    ahead = time.time() + 3600
    monkeypatch.setattr(nodes, "time", SimpleNamespace(time=lambda: ahead))
    (status,) = await nodes.read_nodes(nc.jetstream())
    assert nodes.state_of(status, ahead) == "up"


async def test_a_status_nested_thousands_deep_is_skipped_and_the_other_nodes_still_read(bare_nats):
    # Well within the size bound, and too deep for msgspec (a RecursionError, not one of its own errors): skipped
    # like any value that is not a status, not raised into the controller's and every ingress's reads.
    import time

    from pipeline import nodes
    from pipeline.subjects import NODES_STREAM
    from schemas.cluster import NodeFacts, NodeStatus

    _, nc = bare_nats
    js = nc.jetstream()
    facts = NodeFacts(id="0123456789ab", host="h", memory_total=8 * 10**9, memory_available=4 * 10**9)
    await nodes.put_status(js, NodeStatus(facts=facts, memory_used=0, time=time.time()))
    await js.publish(nodes.node_subject("ba9876543210"), b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                     stream=NODES_STREAM)
    assert [s.facts.id for s in await nodes.read_nodes(js)] == ["0123456789ab"]
