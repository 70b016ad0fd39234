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

