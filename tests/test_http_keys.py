"""API keys over HTTP, without a broker: the key file and $CONCLAVE_API_KEYS, the `Authorization` check, the
caller it gives the job, and what /health shows with and without a key.

The routes are the real `guarded` and `health` (ingress/app.py, ingress/handlers.py) in a small Starlette app
whose `app.state.ingress` is a stand-in: this is the HTTP layer alone.
"""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ingress import handlers
from ingress.app import answering_hosts, guarded
from ingress.keys import APIKeyError, caller_of, load_api_keys
from schemas.jobs import WorkerStatus
from schemas.openai import ChatCompletionRequest

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-fedcba9876543210xyz"
KEYS = {"alice": ALICE, "bob": BOB}


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


# --- loading keys -------------------------------------------------------------------------------------------

def key_file(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_key_file_lines_comments_and_blank_lines(tmp_path):
    path = key_file(tmp_path, f"# who may call\n\nalice {ALICE}\n  bob\t{BOB}   # the batch jobs\n")
    assert load_api_keys(path, None) == KEYS


def test_env_value(tmp_path):
    assert load_api_keys(None, f"alice:{ALICE}, bob:{BOB},") == KEYS
    assert load_api_keys(None, None) == {} and load_api_keys(None, "  ") == {}


def test_file_and_env_together(tmp_path):
    path = key_file(tmp_path, f"alice {ALICE}\n")
    assert load_api_keys(path, f"bob:{BOB}") == KEYS


def test_key_with_padding_and_slash():
    key = "abc/def+ghi~jkl.mn_o-p=="
    assert load_api_keys(None, f"svc:{key}") == {"svc": key}


@pytest.mark.parametrize("env, error", [
    (f"alice{ALICE}", "expected `NAME:KEY`"),
    (f"al ice:{ALICE}", "a name is 1 to 64"),
    (f"{'n' * 65}:{ALICE}", "a name is 1 to 64"),
    (f":{ALICE}", "a name is 1 to 64"),
    ("alice:short-key", "has 9 characters; at least 16"),
    ("alice:" + "k" * 15 + "\u00e9", "a character outside"),
    ("alice:" + "k" * 10 + "=abcdefg", "a character outside"),  # `=` only at the end
    (f"alice:{ALICE},alice:{BOB}", "the name `alice` is given twice"),
    (f"alice:{ALICE},bob:{ALICE}", "the key of `bob` is also the key of `alice`"),
])
def test_env_errors(env, error):
    with pytest.raises(APIKeyError, match=error) as caught:
        load_api_keys(None, env)
    assert ALICE not in str(caught.value) and BOB not in str(caught.value)  # never the key in the message


@pytest.mark.parametrize("text, error", [
    (f"alice {ALICE} extra\n", r"line 1: expected `NAME KEY`, got 3 fields"),
    ("# c\n\nalice\n", r"line 3: expected `NAME KEY`, got 1 fields"),
    ("alice tooshort\n", r"line 1: the key of `alice` has 8 characters"),
    ("# only comments\n\n", "has no keys"),
])
def test_file_errors(tmp_path, text, error):
    with pytest.raises(APIKeyError, match=error):
        load_api_keys(key_file(tmp_path, text), None)


def test_duplicate_across_file_and_env(tmp_path):
    with pytest.raises(APIKeyError, match="the name `alice` is given twice"):
        load_api_keys(key_file(tmp_path, f"alice {ALICE}\n"), f"alice:{BOB}")


def test_missing_file(tmp_path):
    with pytest.raises(APIKeyError, match="cannot read the API key file"):
        load_api_keys(tmp_path / "absent", None)


def test_warns_when_others_can_read_the_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="conclave.ingress"):
        load_api_keys(key_file(tmp_path, f"alice {ALICE}\n", 0o600), None)
        assert not caplog.records
        load_api_keys(key_file(tmp_path, f"alice {ALICE}\n", 0o644), None)
    (record,) = caplog.records
    assert "can be read by other users" in record.getMessage() and ALICE not in record.getMessage()


def test_cli_has_no_api_key_flag(tmp_path, capsys):
    from ops.cli import parser

    for argv in (["--api-key", ALICE], [f"--api-key={ALICE}"], ["--api-key"]):
        with pytest.raises(SystemExit) as caught:
            parser().parse_args(["serve", *argv])
        assert caught.value.code == 2
        error = capsys.readouterr().err
        assert "--api-key was removed" in error and ALICE not in error  # not taken for --api-key-file KEY
    args = parser().parse_args(["serve", "--api-key-file", str(tmp_path / "k")])
    assert args.api_key_file == tmp_path / "k"


def test_cli_error_is_one_line(tmp_path, capsys, monkeypatch):
    from ops.cli import main

    monkeypatch.delenv("CONCLAVE_API_KEYS", raising=False)
    with pytest.raises(SystemExit) as caught:
        main(["--home", str(tmp_path), "serve", "--api-key-file", str(key_file(tmp_path, "alice short\n"))])
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("conclave: error: ")


# --- the guard and the caller -------------------------------------------------------------------------------

WORKER = WorkerStatus(worker="w1", model="m", pid=4242, host="gpu-7", state="ready", active=3)


class StandIn:
    """What `health` and `complete` read from the Ingress, without NATS."""

    def __init__(self, connected: bool = True, workers: list | None = None, hosts: frozenset[str] | None = None):
        self.config = SimpleNamespace(hosts=hosts)
        self.models = {"m": SimpleNamespace(id="m")}
        self.link = SimpleNamespace(is_connected=connected, nc=SimpleNamespace(max_payload=1 << 20))
        self.live = [WORKER] if workers is None else workers
        self.workers = SimpleNamespace(live=lambda model: self.live)

    def require_model(self, name):
        return self.models[name]


async def whoami(request):
    return JSONResponse({"caller": request.state.caller})


async def chat(request):
    return await handlers.complete(request, ChatCompletionRequest, lambda req, caller: caller, None)


def client(keys: dict[str, str], monkeypatch=None, base_url: str = "http://testserver", **stand_in) -> TestClient:
    if monkeypatch is not None:  # the job goes nowhere: respond answers with its caller
        async def respond(request, ingress, job, stream, include_usage, shape):
            return JSONResponse({"job_caller": job})
        monkeypatch.setattr(handlers, "respond", respond)
    app = Starlette(routes=[
        Route("/v1/whoami", guarded(whoami, keys), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat, keys), methods=["POST"]),
        Route("/health", guarded(handlers.health, keys, open_to_all=True), methods=["GET"]),
    ])
    app.state.ingress = StandIn(**stand_in)
    return TestClient(app, base_url=base_url)


@pytest.mark.parametrize("header", [f"Bearer {ALICE}", f"bearer {ALICE}", f"BEARER {ALICE}", f"Bearer   {ALICE} "])
def test_bearer_scheme_in_any_case(header):
    answer = client(KEYS).get("/v1/whoami", headers={"Authorization": header})
    assert answer.status_code == 200
    assert answer.json() == {"caller": f"key:alice:{fingerprint(ALICE)}"}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": ALICE},  # a bare key, no scheme
    {"Authorization": f"Basic {ALICE}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {ALICE[:-1]}"},
    {"Authorization": f"Bearer {ALICE}x"},
    {"Authorization": f"Bearer {ALICE} {BOB}"},
    {"Authorization": "Bearer not-any-key-at-all-here"},
])
def test_refused(headers):
    answer = client(KEYS).get("/v1/whoami", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    error = answer.json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("invalid_api_key", "invalid_request_error", None)
    assert ALICE not in answer.text and BOB not in answer.text and "alice" not in answer.text


def test_each_key_names_its_caller_in_the_job(monkeypatch):
    http = client(KEYS, monkeypatch)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for name, key in KEYS.items():
        answer = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert answer.json() == {"job_caller": f"key:{name}:{fingerprint(key)}"} == {"job_caller": caller_of(name, key)}
    assert http.post("/v1/chat/completions", json=body).status_code == 401


def test_a_replaced_key_gets_another_caller():
    assert caller_of("alice", ALICE) != caller_of("alice", BOB)


def test_without_keys_everyone_is_anonymous(monkeypatch):
    http = client({}, monkeypatch)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert http.post("/v1/chat/completions", json=body).json() == {"job_caller": "anonymous"}
    assert http.get("/v1/whoami", headers={"Authorization": "Bearer whatever"}).json() == {"caller": "anonymous"}


def test_a_page_on_another_site_cannot_make_a_browser_call_the_api(monkeypatch):
    # A form or a no-cors fetch from any site reaches this port from the operator's browser without a preflight: it
    # must not run (here: load a model, burn the machines), key or no key. SDKs and curl send no Origin.
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for keys, headers in (({}, {}), (KEYS, {"Authorization": f"Bearer {ALICE}"})):
        http = client(keys, monkeypatch)
        for origin in ("http://attacker.example", "http://testserver.attacker.example", "null"):
            answer = http.post("/v1/chat/completions", json=body, headers={**headers, "Origin": origin})
            assert answer.status_code == 403 and answer.json()["error"]["code"] == "cross_origin_refused"
            assert "job_caller" not in answer.text
        # The dashboard's own page, directly or behind a proxy that was asked by another name.
        assert http.post("/v1/chat/completions", json=body, headers={**headers, "Origin": "http://testserver"}).json()
        proxied = {**headers, "Origin": "https://conclave.corp", "X-Forwarded-Host": "conclave.corp"}
        assert http.post("/v1/chat/completions", json=body, headers=proxied).status_code == 200
        assert http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200


def test_on_loopback_without_keys_only_loopback_names_are_answered():
    # A page whose own name was rebound to 127.0.0.1 is same-origin with this server: only the Host it sends tells.
    assert answering_hosts("127.0.0.1", {}) == answering_hosts("::1", {}) == answering_hosts("localhost", {})
    assert answering_hosts("127.0.0.1", KEYS) is None and answering_hosts("0.0.0.0", {}) is None
    assert answering_hosts("gpu-7.corp", {}) is None
    hosts = answering_hosts("127.0.0.1", {})
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://LOCALHOST"):
        assert client({}, base_url=url, hosts=hosts).get("/v1/whoami").json() == {"caller": "anonymous"}, url
    answer = client({}, base_url="http://attacker.example:8000", hosts=hosts).get(
        "/v1/whoami", headers={"Origin": "http://attacker.example:8000"})
    assert answer.status_code == 421 and answer.json()["error"]["code"] == "host_not_allowed"


def test_an_unhandled_error_is_a_500_in_the_routes_own_shape():
    # A bug, or NATS closing the connection under a request: Anthropic's SDK reads Anthropic's error object.
    from ingress import anthropic

    async def boom(request):
        raise RuntimeError("connection closed")

    app = Starlette(routes=[Route("/v1/messages", guarded(boom, {}, render=anthropic.error_response), methods=["POST"]),
                            Route("/v1/chat/completions", guarded(boom, {}), methods=["POST"])])
    app.state.ingress = StandIn()
    http = TestClient(app, raise_server_exceptions=False)
    answer = http.post("/v1/messages", json={})
    assert answer.status_code == 500 and answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "api_error" and "connection closed" not in answer.text
    answer = http.post("/v1/chat/completions", json={})
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"


# --- /health ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": ALICE}])
def test_health_without_a_valid_key_is_only_up_or_down(headers):
    up = client(KEYS).get("/health", headers=headers)
    assert (up.status_code, up.json()) == (200, {"status": "ok"})
    down = client(KEYS, connected=False).get("/health", headers=headers)
    assert (down.status_code, down.json()) == (503, {"status": "unavailable"})
    no_worker = client(KEYS, workers=[]).get("/health", headers=headers)
    assert (no_worker.status_code, no_worker.json()) == (503, {"status": "unavailable"})
    assert "www-authenticate" not in up.headers


def test_health_with_a_key_shows_the_details():
    answer = client(KEYS).get("/health", headers={"Authorization": f"bearer {BOB}"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok" and body["nats"] == "connected"
    assert body["models"]["m"]["live_workers"][0]["pid"] == 4242


def test_health_is_down_while_a_worker_cannot_append_audit_records():
    failing = msgspec.structs.replace(WORKER, problem="audit log: records are refused (NoRespondersError)")
    assert client(KEYS, workers=[failing]).get("/health").status_code == 503
    body = client(KEYS, workers=[failing]).get("/health", headers={"Authorization": f"Bearer {BOB}"}).json()
    assert body["status"] == "unavailable" and body["problems"] == [failing.problem]


def test_health_without_keys_configured_shows_the_details():
    body = client({}).get("/health").json()
    assert body["models"]["m"]["live_workers"][0]["host"] == "gpu-7"
