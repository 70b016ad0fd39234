"""Model files between nodes (ops/model_files.py): a real HTTP file port and a real nats-server for the tickets; a
model directory of made-up bytes (the transfer does not read them).

What matters to an operator moving hundreds of gigabytes: what arrives is what the source's manifest says or it is
refused, an interrupted transfer goes on from where it stopped, nothing is read without a ticket, and no name a
source sends can reach outside the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import uvicorn

from ops.config import free_port
from ops import model_fetch
from ops.cluster_tls import self_signed
from ops.model_fetch import FetchError, check_room, fetch_model, fetch_part, pinned, sha256_of
from ops.model_files import Tickets, answer_tickets, ask_ticket, files_app, manifest
from pipeline.access import AGENTS_PREFIX, inbox_prefix, is_inbox
from pipeline.subjects import CONTROL_PREFIX
from schemas.catalogue import ModelManifest, Ticket
from workers.split import layer_files, stage_files
from workers.store import ModelStore, model_revision

MODEL_ID = "acme/tiny-model"
SIZES = {"config.json": 64, "model-00001-of-00002.safetensors": 3_000_000,
         "model-00002-of-00002.safetensors": 1_500_001, "tokenizer.json": 10_000}


def make_model(store: ModelStore) -> Path:
    path = store.path(MODEL_ID)
    path.mkdir(parents=True)
    for name, size in SIZES.items():
        (path / name).write_bytes(os.urandom(size))
    return path


@contextlib.asynccontextmanager
async def serving(store: ModelStore, tickets: Tickets, receiving=lambda model: False, before=None):
    """The file port on loopback, over TLS as a node serves it; yields a maker of tickets for it (for MODEL_ID) and
    the Range header of each request it got. `before(query)` is awaited before a request is answered."""
    app, ranges = files_app(store, tickets, receiving), []
    tls = store.root.parent / f"{store.root.name}-tls"
    tls.mkdir(exist_ok=True)
    certificate, key, pem = self_signed(tls, "files", ["127.0.0.1"])

    async def recording(scope, receive, send):
        if scope["type"] == "http":
            ranges.append(dict(scope["headers"]).get(b"range", b"").decode())
            if before is not None:
                await before(scope["query_string"].decode())
        await app(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(recording, host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(certificate), ssl_keyfile=str(key)))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield (lambda: Ticket(url=f"https://127.0.0.1:{port}", certificate=pem, token=tickets.issue(MODEL_ID))), ranges
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def source(tmp_path) -> tuple[ModelStore, Path]:
    store = ModelStore(tmp_path / "source")
    return store, make_model(store)


async def test_a_model_arrives_whole_and_as_its_manifest_says(source, tmp_path):
    store, path = source
    tickets, receiver = Tickets(), ModelStore(tmp_path / "receiver")
    seen = []
    async with serving(store, tickets) as (ticket, _):
        fetched = await fetch_model(ticket(), MODEL_ID, receiver, lambda done, total, files: seen.append(
            (done, total, files)))
    assert fetched is not None and fetched.id == MODEL_ID and receiver.get(MODEL_ID) is not None
    for name in SIZES:
        assert (fetched.path / name).read_bytes() == (path / name).read_bytes()
    listed = manifest(store.get(MODEL_ID))
    assert {f.name: f.sha256 for f in listed.files} == {n: sha256_of(path / n).hexdigest() for n in SIZES}
    assert seen[-1][:2] == (sum(SIZES.values()), sum(SIZES.values()))
    # Each file's own progress, while it was on its way: up to its whole size, never past it.
    for name, size in SIZES.items():
        assert max(f.done for _, _, files in seen for f in files if f.name == name) == size
    assert all(f.done <= f.total for _, _, files in seen for f in files)
    assert not any((receiver.root / ".incoming").iterdir())  # nothing half-arrived left behind
    # The hashes it was checked against came with it: serving it on to the next node hashes nothing again.
    assert (fetched.path / ".conclave-manifest.json").is_file() and manifest(fetched).files == listed.files


async def test_a_pipeline_rank_fetches_only_its_stages_files_and_keeps_what_a_later_plan_still_uses(source, tmp_path,
                                                                                                   monkeypatch):
    store, path = source
    monkeypatch.setattr(model_fetch, "FETCH_PARALLEL", 4)  # several files at once, as on a machine with cores to spare
    tickets, receiver = Tickets(), ModelStore(tmp_path / "receiver")
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    gates: dict[str, asyncio.Event] = {}  # a file's request is answered once its gate opens

    async def gated(query: str) -> None:
        for name, gate in list(gates.items()):
            if f"name={name}" in query:
                await gate.wait()

    async with serving(store, tickets, before=gated) as (ticket, ranges):
        folder = await fetch_part(ticket(), MODEL_ID, receiver, {second})
        assert sorted(p.name for p in folder.iterdir() if p.name[0] != ".") == ["config.json", second,
                                                                                  "tokenizer.json"]
        assert receiver.get(MODEL_ID) is None and receiver.list() == []  # a part is never a model of the store
        assert receiver.shards() == {MODEL_ID: [second]}  # what the node reports holding
        assert model_revision(folder) == model_revision(path)  # the whole model's, for the audit log
        asked = len(ranges)
        # Another plan: this node's stage now needs both files; the one it has is not fetched again.
        await fetch_part(ticket(), MODEL_ID, receiver, {first, second})
        assert len(ranges) == asked + 2  # the manifest and the first file
        assert receiver.shards() == {MODEL_ID: [first, second]}
        with pytest.raises(FetchError, match="no weight file"):
            await fetch_part(ticket(), MODEL_ID, receiver, {"model-00009.safetensors"})
        # Interrupted in its last file (files arrive several at a time: the last one's request is answered once the
        # others are whole): the files that arrived are recorded (the node reports them, and they are not fetched
        # again); the rest resumes from where it stopped.
        other, halt = ModelStore(tmp_path / "other"), threading.Event()
        before_last = SIZES["config.json"] + SIZES["tokenizer.json"] + SIZES[first]
        loop, gates[second] = asyncio.get_running_loop(), asyncio.Event()

        def moved(done: int, total: int, files) -> None:  # (from the fetch's threads)
            if done >= before_last:
                loop.call_soon_threadsafe(gates[second].set)
            if done > before_last:
                halt.set()

        with pytest.raises(FetchError, match="stopped"):
            await fetch_part(ticket(), MODEL_ID, other, {first, second}, moved, halt)
        del gates[second]
        assert other.shards() == {MODEL_ID: [first]}
        have = (other.shard_path(MODEL_ID) / f"{second}.partial").stat().st_size
        assert 0 < have < SIZES[second]
        asked = len(ranges)
        await fetch_part(ticket(), MODEL_ID, other, {first, second})
        assert ranges[asked:] == ["", f"bytes={have}-"]  # the manifest, then the last file from where it stopped
        assert other.shards() == {MODEL_ID: [first, second]}
    assert (folder / first).read_bytes() == (path / first).read_bytes()


def test_a_stage_reads_the_files_of_its_layers_and_those_of_no_layer():
    weights = {"model.embed_tokens.weight": "a", "model.layers.0.mlp.weight": "a", "model.layers.1.mlp.weight": "b",
               "model.layers.2.mlp.weight": "c", "model.layers.3.mlp.weight": "c", "model.norm.weight": "d",
               "lm_head.weight": "d"}
    assert stage_files(*layer_files(weights), 0, 2) == {"a", "b", "d"}
    assert stage_files(*layer_files(weights), 2, 4) == {"a", "c", "d"}


async def test_a_receiver_passes_a_model_on_as_it_arrives_and_a_cut_relay_is_resumed_from_the_source(source, tmp_path):
    """Fan-out in a chain (ops/model_relay.py): B fetches from A while A fetches from the source. The source holds
    A's request for the last file until B has everything A has: B got those bytes from A before A had them all."""
    store, path = source
    last = sorted(SIZES)[-2]  # the last to arrive: a model's weights come after its small files (config, tokenizer)
    release, failing = asyncio.Event(), asyncio.Event()

    async def hold_the_last_file(query: str) -> None:
        if f"name={last}" in query:
            await release.wait()
            if failing.is_set():  # the source dies under A: A stops receiving, B's relay is cut
                raise ConnectionResetError

    a_store, b_store, a_receiving = ModelStore(tmp_path / "a"), ModelStore(tmp_path / "b"), {MODEL_ID}
    source_tickets, a_tickets = Tickets(), Tickets()
    for cut in (False, True):
        shutil.rmtree(a_store.root, ignore_errors=True)
        shutil.rmtree(b_store.root, ignore_errors=True)
        release.clear()
        failing.set() if cut else failing.clear()
        a_receiving.add(MODEL_ID)
        b_done = []
        async with serving(store, source_tickets, before=hold_the_last_file) as (source_ticket, source_asked), \
                serving(a_store, a_tickets, a_receiving.__contains__) as (a_ticket, a_asked):
            async def a_fetches():
                try:
                    await fetch_model(source_ticket(), MODEL_ID, a_store)
                finally:
                    a_receiving.discard(MODEL_ID)

            a = asyncio.create_task(a_fetches())
            b = asyncio.create_task(fetch_model(a_ticket(), MODEL_ID, b_store,
                                                lambda done, total, files: b_done.append(done)))
            before_last = sum(size for name, size in SIZES.items() if name != last)
            deadline = time.monotonic() + 60
            while not b_done or b_done[-1] < before_last:  # B has what A has, from A, while A still waits
                assert not b.done(), b.exception()
                assert time.monotonic() < deadline, f"B never had what A had: {b_done[-1:]} of {before_last}"
                await asyncio.sleep(0.01)
            assert MODEL_ID in a_receiving and a_store.get(MODEL_ID) is None
            release.set()
            if not cut:
                await asyncio.gather(a, b)
            else:
                with pytest.raises(Exception):
                    await a
                with pytest.raises(Exception):  # cut short: not taken as the file
                    await b
                assert b_store.get(MODEL_ID) is None
                failing.clear()
                await fetch_model(source_ticket(), MODEL_ID, b_store)  # resumed there
                assert len(source_asked) == (1 + len(SIZES)) + 2  # A's; then B's manifest and the file it lacked
        assert all(r == "" for r in a_asked), a_asked  # B asked A for each file from its start
        assert all((b_store.get(MODEL_ID).path / n).read_bytes() == (path / n).read_bytes() for n in SIZES)


async def test_a_byte_flipped_at_the_source_is_detected_and_the_file_refused(source, tmp_path):
    store, path = source
    manifest(store.get(MODEL_ID))  # hashed while sound, as a long-running source would have
    damaged = path / "model-00002-of-00002.safetensors"
    stat = damaged.stat()
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # silent damage: size and time unchanged
    tickets, receiver = Tickets(), ModelStore(tmp_path / "receiver")
    async with serving(store, tickets) as (ticket, _):
        with pytest.raises(FetchError, match="does not match its SHA-256 after 2 tries: refused"):
            await fetch_model(ticket(), MODEL_ID, receiver)
    assert receiver.get(MODEL_ID) is None  # not in the store, not listed, no rank starts on it
    incoming = receiver.root / ".incoming" / receiver.path(MODEL_ID).name
    assert not (incoming / damaged.name).exists() and not (incoming / f"{damaged.name}.partial").exists()


async def test_an_interrupted_transfer_goes_on_from_where_it_stopped(source, tmp_path):
    store, path = source
    tickets, receiver = Tickets(), ModelStore(tmp_path / "receiver")
    name = "model-00001-of-00002.safetensors"
    incoming = receiver.root / ".incoming" / receiver.path(MODEL_ID).name
    incoming.mkdir(parents=True)
    (incoming / f"{name}.partial").write_bytes((path / name).read_bytes()[:1_234_567])  # where a kill left it
    (incoming / "tokenizer.json").write_bytes(b"an older revision's")  # whole, but not this manifest's
    (incoming / "old-00003.safetensors").write_bytes(b"a file this manifest does not list")
    async with serving(store, tickets) as (ticket, ranges):
        fetched = await fetch_model(ticket(), MODEL_ID, receiver)
    for file in SIZES:
        assert (fetched.path / file).read_bytes() == (path / file).read_bytes()
    assert not (fetched.path / "old-00003.safetensors").exists()
    assert "bytes=1234567-" in ranges and ranges.count("") == len(SIZES)  # the manifest and three whole files


async def test_nothing_is_read_without_a_ticket_for_that_model_and_no_name_leaves_the_model(source, tmp_path):
    store, path = source
    (store.root / "secret.txt").write_text("not a model file")
    tickets = Tickets()
    other = tickets.issue("another-model")
    good = tickets.issue(MODEL_ID)
    async with serving(store, tickets) as (ticket, _):
        door = ticket()
        # TLS from the first byte: nothing answers plain HTTP, and a receiver trusts only the ticket's certificate.
        with pytest.raises(httpx.HTTPError):
            await httpx.AsyncClient().get(door.url.replace("https://", "http://") + "/manifest")
        impostor = Ticket(url=door.url, certificate=self_signed(tmp_path, "impostor", ["127.0.0.1"])[2],
                          token=door.token)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetch_model(impostor, MODEL_ID, ModelStore(tmp_path / "receiver"))
        async with httpx.AsyncClient(base_url=door.url, verify=pinned(door)) as http:
            def get(name: str, token: str | None):
                return http.get("/file", params={"model": MODEL_ID, "name": name},
                                headers={"Authorization": f"Bearer {token}"} if token else {})
            assert (await get("config.json", None)).status_code == 401
            assert (await get("config.json", "made-up")).status_code == 401
            assert (await get("config.json", other)).status_code == 401
            odd = await http.get("/file", params={"model": MODEL_ID, "name": "config.json"},
                                 headers={"Authorization": b"Bearer ticket-\xe9"})
            assert odd.status_code == 401  # not a 500
            assert (await get("config.json", good)).status_code == 200
            for name in ("../secret.txt", "..", ".conclave-manifest.json", "absent.bin"):
                assert (await get(name, good)).status_code == 404, name
            expired = Tickets(ttl_s=0.0)
            assert not expired.allows(expired.issue(MODEL_ID), MODEL_ID)


def test_a_manifest_naming_a_path_outside_the_model_is_refused_as_it_is_decoded():
    for name in ("../../etc/passwd", "/etc/passwd", ".hidden", "a/b.json", "", "model.safetensors.partial"):
        body = {"model": MODEL_ID, "files": [{"name": name, "size": 1, "sha256": "0" * 64}]}
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(msgspec.json.encode(body), type=ModelManifest)


def test_the_disk_space_a_model_needs_is_checked_before_anything_is_written(tmp_path):
    huge = msgspec.convert({"model": MODEL_ID, "files": [{"name": "model.safetensors", "size": 10**18,
                                                          "sha256": "0" * 64}]}, ModelManifest)
    with pytest.raises(FetchError, match=r"needs 1000000000.0 GB more on this node's disk .* GB are free"):
        check_room(tmp_path, huge)


async def test_tickets_are_asked_for_over_nats(bare_nats, source):
    server, nc = bare_nats
    store, _ = source
    tickets = Tickets()
    subscription = await answer_tickets(nc, "0123456789ab", store, tickets, "https://10.0.0.2:8471", "PEM")
    try:
        ticket = await ask_ticket(nc, "0123456789ab", MODEL_ID)
        assert ticket.url == "https://10.0.0.2:8471" and ticket.certificate == "PEM"
        assert tickets.allows(ticket.token, MODEL_ID)
        with pytest.raises(FetchError, match="is not on node 0123456789ab"):
            await ask_ticket(nc, "0123456789ab", "not-here")
    finally:
        await subscription.unsubscribe()


def test_live_tickets_are_bounded_and_the_least_recently_used_is_given_up_first():
    # Any node may ask for tickets as often as it likes: what a node holds for them must not grow with the asking.
    tickets = Tickets(limit=3)
    first, second, third = (tickets.issue(MODEL_ID) for _ in range(3))
    assert tickets.allows(first, MODEL_ID)  # used: now the most recent
    fourth = tickets.issue(MODEL_ID)
    assert not tickets.allows(second, MODEL_ID)
    assert all(tickets.allows(t, MODEL_ID) for t in (first, third, fourth))
    for _ in range(10_000):
        tickets.issue("another-model")
    assert len(tickets.issued) == 3


async def test_a_request_is_answered_only_into_an_inbox_not_wherever_its_reply_subject_points(bare_nats, source):
    # NATS checks no permission on a request's reply subject, and the first machine answers with the operator's
    # rights: a ticket (or the CA certificate) sent "in reply" to the controller lease's key would overwrite it.
    from pipeline.lease import read_lease

    server, nc = bare_nats
    store, _ = source
    spied = []

    async def spy_on(msg):
        spied.append(msg.data)

    spy = await nc.subscribe(f"{CONTROL_PREFIX}.lease", cb=spy_on)
    subscription = await answer_tickets(nc, "0123456789ab", store, Tickets(), "https://10.0.0.2:8471", "PEM")
    try:
        await nc.publish(f"{AGENTS_PREFIX}.0123456789ab.files", msgspec.json.encode({"model": MODEL_ID}),
                         reply=f"{CONTROL_PREFIX}.lease")
        # Answered in order: once this one is, the one before was handled (and anything it sent is flushed below).
        assert (await ask_ticket(nc, "0123456789ab", MODEL_ID)).token
        await nc.flush()
        assert spied == [] and await read_lease(nc.jetstream()) is None
    finally:
        await subscription.unsubscribe()
        await spy.unsubscribe()


def test_every_responder_answers_through_the_inbox_check():
    # `answer` is the one way a responder replies (pipeline/connection.py); a `msg.respond` elsewhere would skip it.
    root = Path(__file__).parent.parent
    direct = [str(p.relative_to(root)) for folder in ("ops", "pipeline", "ingress", "workers")
              for p in (root / folder).glob("*.py") if "msg.respond(" in p.read_text() and p.name != "connection.py"]
    assert direct == []
    assert is_inbox(f"{inbox_prefix('ca-reader')}.Ab12.3") and is_inbox(f"{inbox_prefix('node-0123456789ab')}.x")
    for subject in (f"{CONTROL_PREFIX}.lease", "$KV.CONCLAVE_NODES.0123456789ab", "conclave.audit.m.x",
                    "conclave.replies.billing.job-1", f"{inbox_prefix('x')}", f"{inbox_prefix('x')}.>", None, ""):
        assert not is_inbox(subject), subject
