"""The console in a real browser (Debian's Chromium driven by Playwright), with JavaScript
OFF: what an operator does, against the API, a delivery worker and the Polar emulator."""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

import polar_emulator
from api.app import create_app
from outbox.db import session_scope
from outbox.delivery.deliverer import Deliverer, drain
from outbox.ledger import grant_credits, record_usage
from outbox.models import OutboxEvent
from outbox.polar.gateway import PolarGateway
from outbox.polar.ratelimit import LocalRateBudget
from outbox.settings import load_settings
from outbox.tokens import revoke_token
from tests.api.console.conftest import make_failed, make_token
from tests.conftest import skip_locally_fail_in_ci

CHROMIUM = os.environ.get("OUTBOX_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        skip_locally_fail_in_ci(f"playwright is not installed: {exc}")
    if not os.path.exists(CHROMIUM):
        skip_locally_fail_in_ci(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Console:
    url: str
    engine: Engine
    emulator: polar_emulator.RunningEmulator
    browser: Any

    def page(self, token: str | None = None) -> Any:
        """A new browser page (JavaScript off), signed in with `token` if given."""
        context = self.browser.new_context(java_script_enabled=False, base_url=self.url)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        if token is not None:
            sign_in(page, token)
        return page


def sign_in(page: Any, token: str) -> None:
    page.goto("/console/login")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Overview").wait_for()


@pytest.fixture
def console(clean_tables: Engine, pg_url: str, browser: Any) -> Iterator[Console]:
    """The API with its console under uvicorn, and a delivery worker draining to the emulator."""
    emulator = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=5))
    settings = load_settings(
        database_url=pg_url,
        polar_access_token=emulator.token,
        polar_base_url=emulator.url,
        outbox_clock_margin_seconds=0,
        outbox_backoff_base_seconds=0.05,
        outbox_backoff_cap_seconds=0.2,
    )
    app = create_app(settings, engine=clean_tables)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    deliverer = Deliverer(
        sessionmaker(bind=clean_tables, expire_on_commit=False),
        PolarGateway(settings, budget=LocalRateBudget(100_000)),
        settings,
        worker_id="browser-test-worker",
        rng=random.Random(1),
    )
    stop = threading.Event()

    def deliver() -> None:
        while not stop.is_set():
            drain(deliverer, max_seconds=2, should_stop=stop.is_set)
            stop.wait(0.1)

    worker = threading.Thread(target=deliver, daemon=True)
    worker.start()
    yield Console(f"http://127.0.0.1:{sock.getsockname()[1]}", clean_tables, emulator, browser)
    stop.set()
    worker.join(10)
    server.should_exit = True
    thread.join(10)
    sock.close()
    emulator.stop()


def refused_by_polar(console: Console, customer: str, message: str, count: int = 1) -> list[int]:
    """Failed events of `customer` that Polar refuses (until told otherwise)."""
    console.emulator.configure(
        reject_customers=[*console.emulator.state.config.reject_customers, customer]
    )
    return make_failed(console.engine, customer=customer, message=message, count=count)


def status_of(engine: Engine, ids: list[int]) -> set[str]:
    with session_scope(engine) as session:
        return set(session.scalars(select(OutboxEvent.status).where(OutboxEvent.id.in_(ids))))


def test_sign_in_and_sign_out(console: Console) -> None:
    token, _ = make_token(console.engine, "admin", name="ops")
    page = console.page(token)
    assert page.get_by_text("token").first.is_visible()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    page.goto("/console/failed")
    page.get_by_role("heading", name="Sign in").wait_for()  # the session is gone


def test_a_wrong_token_does_not_sign_in(console: Console) -> None:
    page = console.page()
    page.goto("/console/login")
    page.get_by_label("Token").fill("pou_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").wait_for()
    assert "unknown, revoked" in page.get_by_role("alert").inner_text()


def test_replaying_a_failed_event_from_the_browser_delivers_it(console: Console) -> None:
    message = "422: customer cust_b1 is not known to Polar (test)"
    [event_id] = refused_by_polar(console, "cust_b1", message)
    token, _ = make_token(console.engine, "admin", name="alice")
    page = console.page(token)
    page.get_by_role("link", name="Failed", exact=True).click()
    assert page.get_by_text(message).first.is_visible()  # Polar's whole message

    console.emulator.configure(reject_customers=[])  # the cause is fixed
    page.get_by_label(f"select event {event_id}").check()
    page.get_by_role("button", name="Replay the selected events…").click()
    page.get_by_role("heading", name="Replay: what will happen").wait_for()
    assert '"external_customer_id": "cust_b1"' in page.locator("pre.payload").first.text_content()
    page.get_by_label("Why").fill("customer created in Polar")
    page.get_by_label("I have fixed the cause").check()
    page.get_by_role("button", name="Replay 1 event(s)").click()

    page.get_by_role("heading", name=re.compile(r"Replay #\d+")).wait_for()
    assert page.get_by_text("customer created in Polar").is_visible()
    # The page refreshes itself (no JavaScript) until nothing is pending.
    page.locator("span.state-delivered").wait_for(timeout=WAIT_MS)
    assert status_of(console.engine, [event_id]) == {"delivered"}
    assert console.emulator.state.totals().get("cust_b1") == 2

    page.goto(f"/console/events/{event_id}")
    history = page.locator("table.history").inner_text()
    assert "failed" in history and "replayed" in history and "delivered" in history
    assert message in history and "customer created in Polar" in history
    page.goto("/console/audit")
    assert "customer created in Polar" in page.locator("table").inner_text()


def test_a_group_replay_moves_that_group_only(console: Console) -> None:
    first = refused_by_polar(console, "cust_g1", "422: first reason", count=3)
    second = refused_by_polar(console, "cust_g2", "422: second reason", count=2)
    console.emulator.configure(reject_customers=["cust_g2"])
    token, _ = make_token(console.engine, "admin")
    page = console.page(token)
    page.goto("/console/failed")
    row = page.locator("table.groups tr", has_text="422: first reason")
    assert "3" in row.inner_text()
    row.get_by_role("button", name="Replay this group…").click()
    assert page.get_by_role("button", name="Replay 3 event(s)").is_visible()
    page.get_by_label("Why").fill("first cause fixed")
    page.get_by_label("I have fixed the cause").check()
    page.get_by_role("button", name="Replay 3 event(s)").click()
    page.get_by_role("heading", name=re.compile(r"Replay #\d+")).wait_for()
    deadline = time.monotonic() + 20
    while status_of(console.engine, first) != {"delivered"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status_of(console.engine, first) == {"delivered"}
    assert status_of(console.engine, second) == {"failed"}


def test_refunding_a_delivered_usage_from_its_page_compensates_it_in_polar(
    console: Console,
) -> None:
    with session_scope(console.engine) as session:
        grant_credits(session, "cust_r1", 10, reason="test")
        event_id = record_usage(session, "cust_r1", 2, {}).event_id
    deadline = time.monotonic() + 20
    while status_of(console.engine, [event_id]) != {"delivered"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert console.emulator.state.totals().get("cust_r1") == 2
    token, _ = make_token(console.engine, "admin", name="bob")
    page = console.page(token)
    page.goto(f"/console/events/{event_id}")
    assert page.get_by_label("Credits").input_value() == "2"  # all of it, by default
    page.get_by_label("Why").fill("the generation failed")
    page.get_by_role("button", name="Refund").click()
    page.get_by_text("2 of 2 credits refunded").wait_for()
    assert page.get_by_role("button", name="Refund").count() == 0
    assert "the generation failed" in page.locator("table.refunds").inner_text()
    # The compensating event reaches Polar: the customer's total there is back to zero.
    page.locator("table.refunds a").click()
    page.get_by_text(f"compensates a refund of usage #{event_id}").wait_for()
    deadline = time.monotonic() + 20
    while console.emulator.state.totals().get("cust_r1") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert console.emulator.state.totals().get("cust_r1") == 0
    page.goto("/console/audit")
    assert "the generation failed" in page.locator("table").inner_text()


def test_a_viewer_sees_no_replay_button_and_its_post_is_refused(console: Console) -> None:
    [event_id] = refused_by_polar(console, "cust_v1", "422: viewer can read this")
    token, _ = make_token(console.engine, "viewer")
    page = console.page(token)
    page.goto("/console/failed")
    assert page.get_by_text("422: viewer can read this").first.is_visible()
    assert page.get_by_role("button", name=re.compile("Replay")).count() == 0
    page.goto(f"/console/events/{event_id}")
    assert page.get_by_role("button", name=re.compile("Replay")).count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    answer = page.request.post(
        "/console/replay",
        form={"csrf": csrf, "event_id": str(event_id), "reason": "x", "confirm": "yes"},
    )
    assert answer.status == 403
    assert status_of(console.engine, [event_id]) == {"failed"}


def test_a_form_without_its_csrf_token_is_refused(console: Console) -> None:
    [event_id] = refused_by_polar(console, "cust_c1", "422: csrf case")
    token, _ = make_token(console.engine, "admin")
    page = console.page(token)
    page.goto(f"/console/replay/preview?event_id={event_id}")
    form = {"event_id": str(event_id), "reason": "x", "confirm": "yes"}
    assert page.request.post("/console/replay", form=form).status == 403
    assert page.request.post("/console/replay", form={**form, "csrf": "forged"}).status == 403
    assert status_of(console.engine, [event_id]) == {"failed"}


def test_a_revoked_tokens_session_is_refused(console: Console) -> None:
    token, token_id = make_token(console.engine, "admin")
    page = console.page(token)
    page.goto("/console/failed")
    page.get_by_role("heading", name="Failed events").wait_for()
    with session_scope(console.engine) as session:
        revoke_token(session, token_id)
    # Every process hears of the revocation as it commits (as the API does: within a second).
    deadline = time.monotonic() + 3
    while True:
        page.goto("/console/failed")
        if page.get_by_role("heading", name="Sign in").count() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert page.get_by_role("heading", name="Sign in").is_visible()


def test_attacker_text_renders_as_text(console: Console) -> None:
    script = "<script>document.title='owned'</script>"
    customer = f"c{script}"
    [event_id] = refused_by_polar(console, customer, f"422: {script}")
    with session_scope(console.engine) as session:
        row = session.get(OutboxEvent, event_id)
        assert row is not None
        row.event_metadata = {"note": script}
    token, _ = make_token(console.engine, "admin")
    context = console.browser.new_context(base_url=console.url)  # JavaScript ON here
    page = context.new_page()
    sign_in(page, token)
    for path in ["/console/failed", f"/console/events/{event_id}", "/console/events"]:
        page.goto(path)
        assert page.locator("script").count() == 0, path  # nothing became an element
        assert script in page.locator("main").inner_text(), path  # shown as the text it is
        assert page.title() != "owned"
    context.close()
