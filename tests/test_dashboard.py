"""The dashboard in a real headless Chromium (tests/browser.py), on one live deployment: a `conclave serve --cluster`
with an API key and a joined node, on loopback.

What is checked is what its user relies on: without the key the page shows nothing of the cluster; with it every
view renders with no console error; the chat streams its answer and its stop button cancels the job on the server;
a node's memory figure follows its telemetry within 2 s and a killed node is shown lost within 5 s; a model's load
shows its progress and then "loaded"; the audit view lists the records and verifies the chain. Each view is
screenshot into the artefacts folder.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from ops.spawn import spawn_cluster, stop_all, wait_for_line
from tests.browser import ARTEFACTS, launch, open_page
from tests.conftest import FRANCE, MODEL, STORY
from tests.tiny import tiny_llama
from workers.store import ModelStore

KEY_NAME, KEY = "ops-team", "dashboard-test-key-0123456789"
TINY_MODEL = "tiny-llama"
GiB = 2**30


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"{KEY_NAME} {KEY}\n")
    key_file.chmod(0o600)
    first, nodes, _ = spawn_cluster(tmp_path_factory.mktemp("dash-a"), [tmp_path_factory.mktemp("dash-b")], "4",
                                    "--api-key-file", str(key_file), "--checkpoint-interval", "1")
    yield first, nodes
    stop_all([*nodes, first])


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(deployment, browser):
    """The dashboard with the key, shared by the tests below (as one operator would keep it open)."""
    first, _ = deployment
    watched = open_page(browser, first.base_url.removesuffix("/v1") + "/", KEY)
    expect(watched.page.locator("article.node")).to_have_count(2, timeout=30_000)
    yield watched
    watched.page.context.close()


def api(deployment) -> httpx.Client:
    first, _ = deployment
    return httpx.Client(base_url=first.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def show(page, view: str) -> None:
    page.page.get_by_role("link", name=view).click()
    expect(page.page.get_by_role("heading", name=view, exact=False).first).to_be_visible()


def test_without_the_key_nothing_of_the_cluster_is_shown(deployment, browser):
    first, nodes = deployment
    watched = open_page(browser, first.base_url.removesuffix("/v1") + "/")
    try:
        page = watched.page
        expect(page.get_by_role("textbox", name="API key")).to_be_visible()
        watched.screenshot("dashboard-key")
        assert page.locator("article.node").count() == 0 and page.locator("tr[data-model]").count() == 0
        # The page's data is behind the key: its live stream and the audit log answer 401 without it.
        for path in ("/cluster/events", "/audit/records"):
            assert httpx.get(first.base_url + path, timeout=10).status_code == 401
        page.get_by_role("textbox", name="API key").fill("not-the-key-but-long-enough")
        page.get_by_role("button", name="Unlock").click()
        expect(page.get_by_role("alert").filter(has_text="Incorrect API key provided.")).to_be_visible()
        assert page.locator("article.node").count() == 0
        # Pasted with an invisible character (a zero-width space): said at once, not "the server cannot answer"
        # forever (fetch cannot send it at all).
        page.get_by_role("textbox", name="API key").fill(KEY + "\u200b")
        page.get_by_role("button", name="Unlock").click()
        expect(page.get_by_role("alert").filter(has_text="That is not an API key")).to_be_visible()
        page.get_by_role("textbox", name="API key").fill(KEY)
        page.get_by_role("button", name="Unlock").click()
        expect(page.locator("article.node")).to_have_count(2, timeout=30_000)
        expect(page.locator("tr[data-model]").first).to_be_attached()
    finally:
        watched.page.context.close()


def test_every_view_renders_without_console_errors(page):
    for view in ("Cluster", "Models", "Chat", "Audit"):
        show(page, view)
        page.screenshot(f"dashboard-{view.lower()}")
    show(page, "Cluster")
    node = page.page.locator("article.node").first
    expect(node.locator(".memory")).to_contain_text("GB")
    expect(page.page.locator("#topology circle.node")).to_have_count(2)
    # From the keyboard: the views are links reached with Tab and followed with Enter.
    page.page.get_by_role("link", name="Models").focus()
    page.page.keyboard.press("Enter")
    expect(page.page.get_by_role("heading", name="Models")).to_be_visible()
    # At a phone's width every view reflows: nothing wider than the screen.
    page.page.set_viewport_size({"width": 390, "height": 844})
    try:
        for view in ("Cluster", "Models", "Chat", "Audit"):
            show(page, view)
            assert page.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), view
        page.screenshot("dashboard-phone-audit")
    finally:
        page.page.set_viewport_size({"width": 1280, "height": 900})
    assert page.errors == []


def test_chat_streams_the_answer_and_says_how_fast(page):
    show(page, "Chat")
    p = page.page
    p.get_by_label("Model", exact=True).select_option(MODEL)
    p.get_by_label("Temperature", exact=True).fill("0")
    # Every text the answer shows, as the page changes it: a streamed answer grows in steps.
    p.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const answers = document.querySelectorAll('section.chat li.assistant .content');
        if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
      }).observe(document.querySelector('section.chat .messages'), {subtree: true, childList: true, characterData: true}); }""")
    p.get_by_label("Message", exact=True).fill(FRANCE[0]["content"])
    p.get_by_role("button", name="Send").click()
    answer = p.locator("section.chat li.assistant").last
    expect(answer.locator(".stats")).to_contain_text("TTFT", timeout=60_000)
    expect(answer.locator(".content")).to_contain_text("Paris")
    final = answer.locator(".content").text_content()
    partial = {text for text in p.evaluate("window.seen") if text and text != final}
    assert partial and all(final.startswith(text) for text in partial), partial
    assert "tok/s" in answer.locator(".stats").text_content()
    # Conversations are kept in the browser.
    stored = p.evaluate("JSON.parse(localStorage.getItem('conclave-conversations'))")
    assert any(m["content"] == final for c in stored for m in c["messages"])
    page.screenshot("dashboard-chat-answer")
    assert page.errors == []


def test_stop_ends_a_long_answer_and_the_server_records_it_cancelled(page, deployment):
    show(page, "Chat")
    p = page.page
    p.get_by_label("Temperature", exact=True).fill("0")  # greedy: the same long story every time
    p.get_by_label("Max tokens", exact=True).fill("2000")
    p.get_by_label("Message", exact=True).fill(STORY[0]["content"])
    p.get_by_role("button", name="Send").click()
    answer = p.locator("section.chat li.assistant").last
    expect(answer.locator(".content")).not_to_be_empty(timeout=60_000)
    # Meanwhile the throughput view counts it: a request in flight and tokens flowing.
    card = p.locator(f".chart-card[data-model='{MODEL}'] .now")
    expect(card).to_contain_text("1 in flight", timeout=10_000)
    p.get_by_role("button", name="Stop").click()
    expect(answer.locator(".error")).to_have_text("Stopped.")
    expect(p.get_by_role("button", name="Send")).to_be_visible()
    with api(deployment) as http:
        deadline = time.monotonic() + 30
        while not [r for r in http.get("/audit/records").json()["data"]
                   if r["outcome"] == "cancelled" and r["caller"].startswith(f"key:{KEY_NAME}:")]:
            assert time.monotonic() < deadline, "no cancelled record"
            time.sleep(0.2)
    assert page.errors == []


def test_the_audit_view_lists_records_shows_one_and_verifies_the_chain(page, deployment):
    with api(deployment) as http:  # once a checkpoint covers the records above (one is signed every second)
        deadline = time.monotonic() + 30
        while (verdict := http.post("/audit/verify").json())["result"] != "vouched":
            assert verdict["result"] != "broken" and time.monotonic() < deadline, verdict
            time.sleep(0.5)
    show(page, "Audit")
    p = page.page
    expect(p.locator("table.records tr[data-outcome='cancelled']").first).to_be_visible()
    expect(p.locator("table.records tr[data-outcome='done']").first).to_be_visible()
    p.get_by_role("button", name="Verify the chain").click()
    expect(p.locator(".verdict")).to_contain_text("vouched:", timeout=30_000)
    assert p.locator(".verdict").get_attribute("data-result") == "vouched"
    done = p.locator("table.records tr[data-outcome='done']").last
    done.get_by_role("button").click()
    expect(p.get_by_role("region", name="Audit record")).to_contain_text("Paris")
    page.screenshot("dashboard-audit-record")
    assert page.errors == []


def test_a_nodes_memory_figure_follows_its_telemetry_within_2_s(page, deployment):
    first, (joined,) = deployment
    show(page, "Cluster")
    node_id = (joined.home / "node-id").read_text().strip()
    figure = page.page.locator(f"article.node[data-node='{node_id}'] .memory")
    before = int(figure.get_attribute("data-used"))
    with api(deployment) as http:
        ballast = np.ones(GiB // 8 * 3 // 2)  # 1.5 GiB in this process: the machine's used memory grows by as much
        try:
            deadline = time.monotonic() + 10
            while True:  # the node's agent reports it (every second): from then, the page has 2 s
                (status,) = [n for n in http.get("/cluster").json()["nodes"] if n["facts"]["id"] == node_id]
                if status["memory_used"] > before + GiB:
                    reported = time.monotonic()
                    break
                assert time.monotonic() < deadline, "the node's telemetry did not change"
                time.sleep(0.02)
            page.page.wait_for_function(f"document.querySelector(\"article.node[data-node='{node_id}'] .memory\")"
                                        f".dataset.used > {before + GiB}", timeout=2000)
            assert time.monotonic() - reported < 2.0
        finally:
            del ballast


def test_a_model_load_shows_progress_then_loaded(page, deployment):
    first, _ = deployment
    store = ModelStore(first.home / "models")
    tiny_llama(first.home / "models" / ".incoming-tiny", store.path(MODEL))
    (first.home / "models" / ".incoming-tiny").rename(store.path(TINY_MODEL))  # at once, as an import
    show(page, "Models")
    p = page.page
    row = p.locator(f"tr[data-model='{TINY_MODEL}']")
    expect(row.locator(".status")).to_have_text("idle", timeout=30_000)
    row.get_by_role("button", name="Preview").click()
    preview = p.get_by_role("region", name="Placement preview")
    expect(preview).to_contain_text(f"Placement preview: {TINY_MODEL}")
    expect(preview.locator("tbody tr")).to_have_count(1)
    p.evaluate(f"""() => {{ window.statuses = []; new MutationObserver(() => {{
        const badge = document.querySelector("tr[data-model='{TINY_MODEL}'] .status");
        if (badge && window.statuses[window.statuses.length - 1] !== badge.textContent)
          window.statuses.push(badge.textContent);
      }}).observe(document.querySelector("section[aria-labelledby='models-title'] tbody"), {{subtree: true, childList: true, characterData: true}}); }}""")
    row.get_by_role("button", name="Load", exact=True).click()
    expect(row.locator(".status")).to_contain_text("loaded", timeout=120_000)
    statuses = p.evaluate("window.statuses")
    assert any(s.startswith("loading") for s in statuses[:-1]) and statuses[-1].startswith("loaded"), statuses
    expect(row.locator(".where li")).to_have_count(1)
    page.screenshot("dashboard-models-loaded")
    assert page.errors == []


def test_a_killed_node_is_shown_lost_within_5_s(page, deployment):
    _, (joined,) = deployment
    show(page, "Cluster")
    node_id = (joined.home / "node-id").read_text().strip()
    card = page.page.locator(f"article.node[data-node='{node_id}']")
    expect(card).to_have_attribute("data-state", "up")
    joined.kill()
    killed = time.monotonic()
    expect(card).to_have_attribute("data-state", "lost", timeout=5000)
    assert time.monotonic() - killed < 5.0
    expect(card).to_contain_text("last heard")
    page.screenshot("dashboard-node-lost")
    assert ARTEFACTS.is_dir() and page.errors == []


def test_a_dropped_live_connection_shows_the_banner_and_reconnects(deployment, browser):
    first, _ = deployment
    url = first.base_url.removesuffix("/v1") + "/"
    refused = []

    def drop_the_first(route):  # the first connection fails as a network would; the next ones go through
        if not refused:
            refused.append(route.request.url)
            route.abort("connectionreset")
        else:
            route.continue_()

    context = browser.new_context()
    context.add_init_script(f"sessionStorage.setItem('conclave-api-key', {KEY!r})")
    page = context.new_page()
    try:
        page.route("**/v1/cluster/events", drop_the_first)
        page.goto(url)
        expect(page.get_by_role("alert").filter(has_text="live connection")).to_be_visible()
        expect(page.locator(".live")).to_have_text("live", timeout=15_000)
        expect(page.get_by_role("alert").filter(has_text="live connection")).to_be_hidden()
        expect(page.locator("article.node")).to_have_count(2)
        assert refused
    finally:
        context.close()


def test_a_server_stopping_ends_the_live_stream_and_the_page_says_so(page, deployment):
    first, _ = deployment
    expect(page.page.locator(".live")).to_have_text("live")
    # The open stream does not hold the shutdown (uvicorn waits for every connection to end).
    before = len(first.output)
    assert first.stop(timeout_s=30) == 0, "".join(first.output[-60:])
    # The stream ended as a response should, not cut off; and the controller, stopping with this machine, did not take
    # this machine's own agent, which stopped too, for a lost node.
    wait_for_line(first.output, "Conclave stopped.", 10)  # (its last lines may still be on their way to `output`)
    log = "".join(first.output[before:])
    assert "ASGI callable returned without completing response" not in log and "lost: stopping" not in log, log
    expect(page.page.get_by_role("alert").filter(has_text="live connection")).to_be_visible(timeout=10_000)
    expect(page.page.locator(".live")).not_to_have_text("live")
    page.screenshot("dashboard-connection-lost")
