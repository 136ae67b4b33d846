"""The console over HTTP (no browser): access rules, CSRF, headers, escaping, refusals."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from outbox.db import session_scope
from outbox.models import AuditEntry, Customer, OutboxEvent, Replay
from outbox.tokens import revoke_token
from tests.api.console.conftest import csrf_of, make_failed, make_token, sign_in

PAGES = [
    "/console",
    "/console/failed",
    "/console/events",
    "/console/customers",
    "/console/reconcile",
    "/console/webhooks",
    "/console/audit",
]


def test_every_page_asks_to_sign_in_first(console_app: FastAPI) -> None:
    with TestClient(console_app) as client:
        for path in PAGES:
            answer = client.get(path, follow_redirects=False)
            assert (answer.status_code, answer.headers["location"]) == (303, "/console/login")


def test_every_page_renders_for_a_viewer_with_a_strict_policy(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    [event_id] = make_failed(clean_tables, customer="cust_pages", message="422: bad event")
    client = signed_in("viewer")
    for path in [*PAGES, f"/console/events/{event_id}", "/console/customers/cust_pages"]:
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text[:300])
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "http://" not in answer.text and "https://" not in answer.text  # nothing remote


def test_the_session_cookie_is_httponly_strict_and_signed(
    console_app: FastAPI, clean_tables: Engine
) -> None:
    token, _ = make_token(clean_tables, "admin")
    with TestClient(console_app) as client:
        page = client.get("/console/login")
        answer = client.post(
            "/console/login",
            data={"token": token, "csrf": csrf_of(page.text)},
            follow_redirects=False,
        )
        cookie = answer.headers["set-cookie"]
        assert "outbox_console=" in cookie and "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
        value = client.cookies["outbox_console"]
        assert client.get("/console", follow_redirects=False).status_code == 200
        # A forged payload (another token id) with the old signature is not a session.
        payload, signature = value.split(".")
        forged = base64.urlsafe_b64encode(
            json.dumps({"t": 999, "e": 2**40, "n": "x"}).encode()
        ).decode()
        for bad in [f"{forged.rstrip('=')}.{signature}", f"{payload}.x{signature}"]:
            client.cookies.clear()
            client.cookies.set("outbox_console", bad)
            assert client.get("/console", follow_redirects=False).status_code == 303


def test_a_usage_token_cannot_sign_in(console_app: FastAPI, clean_tables: Engine) -> None:
    token, _ = make_token(clean_tables, "usage")
    with TestClient(console_app) as client:
        page = client.get("/console/login")
        answer = client.post(
            "/console/login",
            data={"token": token, "csrf": csrf_of(page.text)},
            follow_redirects=False,
        )
        assert answer.headers["location"] == "/console/login?error=1"
        assert client.get("/console", follow_redirects=False).status_code == 303


def test_a_viewer_sees_no_replay_button_and_its_replay_is_refused(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    [event_id] = make_failed(clean_tables, customer="cust_view", message="422: refused")
    viewer = signed_in("viewer")
    failed = viewer.get("/console/failed")
    assert "422: refused" in failed.text and "Replay" not in failed.text
    answer = viewer.post(
        "/console/replay",
        data={
            "csrf": csrf_of(failed.text),
            "event_id": str(event_id),
            "reason": "try",
            "confirm": "yes",
        },
    )
    assert answer.status_code == 403
    assert replays(clean_tables) == 0 and status_of(clean_tables, event_id) == "failed"


def test_a_change_without_the_csrf_token_is_refused(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    [event_id] = make_failed(clean_tables, customer="cust_csrf", message="422: refused")
    admin = signed_in("admin")
    form = {"event_id": str(event_id), "reason": "fixed", "confirm": "yes"}
    assert admin.post("/console/replay", data=form).status_code == 403
    assert admin.post("/console/replay", data={**form, "csrf": "forged"}).status_code == 403
    assert replays(clean_tables) == 0 and status_of(clean_tables, event_id) == "failed"


def test_a_replay_needs_a_reason_and_a_confirmation(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    [event_id] = make_failed(clean_tables, customer="cust_reason", message="422: refused")
    admin = signed_in("admin")
    csrf = csrf_of(admin.get("/console/failed").text)
    base = {"csrf": csrf, "event_id": str(event_id)}
    assert admin.post("/console/replay", data={**base, "confirm": "yes"}).status_code == 422
    assert (
        admin.post("/console/replay", data={**base, "confirm": "yes", "reason": "  "}).status_code
        == 422
    )
    assert admin.post("/console/replay", data={**base, "reason": "fixed"}).status_code == 422
    assert replays(clean_tables) == 0 and status_of(clean_tables, event_id) == "failed"
    done = admin.post(
        "/console/replay",
        data={**base, "reason": "fixed", "confirm": "yes"},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"].startswith("/console/replays/")
    assert status_of(clean_tables, event_id) == "pending"
    with session_scope(clean_tables) as session:
        entry = session.scalars(select(AuditEntry)).one()
        assert (entry.action, entry.reason) == ("replay", "fixed")
        assert entry.actor.startswith("console: token ")


def test_a_revoked_tokens_session_is_refused(console_app: FastAPI, clean_tables: Engine) -> None:
    token, token_id = make_token(clean_tables, "admin")
    with TestClient(console_app) as client:
        sign_in(client, token)
        assert client.get("/console").status_code == 200
        with session_scope(clean_tables) as session:
            revoke_token(session, token_id)
        # Every process hears of it as it commits, as the API does (within a second).
        deadline = time.monotonic() + 3
        answer = client.get("/console", follow_redirects=False)
        while answer.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
            answer = client.get("/console", follow_redirects=False)
        assert (answer.status_code, answer.headers["location"]) == (303, "/console/login")


def test_attacker_text_is_escaped_everywhere(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    script = "<script>alert(1)</script>"
    [event_id] = make_failed(
        clean_tables,
        customer="c<script>alert(1)</script>",
        message=f"422: {script}",
        metadata={"note": script},
    )
    client = signed_in("admin")
    for path in [
        "/console/failed",
        f"/console/events/{event_id}",
        "/console/events?status=failed",
        "/console/customers/c%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    ]:
        page = client.get(path)
        assert page.status_code == 200, path
        assert "<script" not in page.text, path


def replays(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Replay)) or 0)


def status_of(engine: Engine, event_id: int) -> str:
    with session_scope(engine) as session:
        row = session.get(OutboxEvent, event_id)
        assert row is not None
        return row.status


def test_the_console_works_on_sqlite_as_outbox_dev_serves_it(sqlite_engine: Engine) -> None:
    from api.app import create_app
    from outbox.settings import load_settings

    url = str(sqlite_engine.url)
    app = create_app(load_settings(database_url=url), engine=sqlite_engine)
    [event_id] = make_failed(sqlite_engine, customer="cust_lite", message="422: on sqlite")
    token, _ = make_token(sqlite_engine, "admin")
    with TestClient(app) as client:
        sign_in(client, token)
        for path in [*PAGES, f"/console/events/{event_id}", "/console/customers/cust_lite"]:
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text[:300])
        assert "422: on sqlite" in client.get("/console/failed").text
        preview = client.get(f"/console/replay/preview?event_id={event_id}")
        done = client.post(
            "/console/replay",
            data={
                "csrf": csrf_of(preview.text),
                "event_id": str(event_id),
                "reason": "fixed",
                "confirm": "yes",
            },
            follow_redirects=False,
        )
        assert done.status_code == 303
    assert status_of(sqlite_engine, event_id) == "pending"


def test_the_console_can_be_switched_off_or_served_alone(clean_tables: Engine, pg_url: str) -> None:
    from api.app import create_app
    from outbox.settings import load_settings

    off = create_app(load_settings(database_url=pg_url, outbox_console="off"), engine=clean_tables)
    only = create_app(
        load_settings(database_url=pg_url, outbox_console="only"), engine=clean_tables
    )
    with TestClient(off) as client:
        assert client.get("/console/login").status_code == 404
        assert client.get("/v1/admin/outbox/stats").status_code == 401  # the API is there
    with TestClient(only) as client:
        assert client.get("/console/login").status_code == 200
        assert client.get("/v1/admin/outbox/stats").status_code == 404  # the API is not
        assert client.get("/healthz").status_code == 200


def test_a_group_replay_refuses_a_group_that_changed_since_its_preview(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    ids = make_failed(clean_tables, customer="cust_grp", message="422: grown", count=2)
    admin = signed_in("admin")
    preview = admin.get("/console/replay/preview", params={"message": "422: grown"})
    assert "Replay 2 event(s)" in preview.text
    later = make_failed(clean_tables, customer="cust_grp2", message="422: grown")
    form = {
        "csrf": csrf_of(preview.text),
        "message": "422: grown",
        "expect": "2",
        "reason": "fixed",
        "confirm": "yes",
    }
    refused = admin.post("/console/replay", data=form)
    assert refused.status_code == 422 and "changed since its preview" in refused.text
    assert {status_of(clean_tables, i) for i in ids + later} == {"failed"}
    done = admin.post("/console/replay", data={**form, "expect": "3"}, follow_redirects=False)
    assert done.status_code == 303
    assert {status_of(clean_tables, i) for i in ids + later} == {"pending"}


def audit_entries(engine: Engine, action: str) -> list[AuditEntry]:
    with session_scope(engine) as session:
        query = select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
        entries = list(session.scalars(query))
        session.expunge_all()
        return entries


def balance_of(engine: Engine, customer: str) -> int:
    with session_scope(engine) as session:
        row = session.get(Customer, customer)
        assert row is not None
        return row.balance


def test_an_admin_refunds_a_usage_from_its_page_and_it_is_audited(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    whole, part = make_failed(clean_tables, customer="cust_refund", message="422: no", count=2)
    admin = signed_in("admin")
    page = admin.get(f"/console/events/{whole}")
    assert f'action="/console/events/{whole}/refund"' in page.text
    assert 'name="credits" min="1" max="2" value="2"' in page.text  # default: all of it
    csrf = csrf_of(page.text)
    before = balance_of(clean_tables, "cust_refund")

    # The whole of a usage Polar refused: cancelled, nothing reaches Polar.
    done = admin.post(
        f"/console/events/{whole}/refund",
        data={"csrf": csrf, "reason": "generation failed"},
        follow_redirects=False,
    )
    assert (done.status_code, done.headers["location"]) == (303, f"/console/events/{whole}")
    assert status_of(clean_tables, whole) == "cancelled"
    shown = admin.get(f"/console/events/{whole}").text
    assert "2 of 2 credits refunded" in shown and "cancelled: nothing reaches Polar" in shown
    assert f'action="/console/events/{whole}/refund"' not in shown  # nothing left to refund

    # A part: a compensating event, shown on the usage's page, linked.
    done = admin.post(
        f"/console/events/{part}/refund",
        data={"csrf": csrf, "reason": "half of it was wrong", "credits": "1"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert status_of(clean_tables, part) == "failed"
    assert balance_of(clean_tables, "cust_refund") == before + 3
    [first, second] = audit_entries(clean_tables, "refund")
    assert first.actor.startswith("console: token ") and first.reason == "generation failed"
    assert first.detail["event_id"] == whole and first.detail["credits"] == 2
    assert first.detail["action"] == "cancelled"
    assert (second.detail["event_id"], second.detail["credits"]) == (part, 1)
    assert second.detail["action"] == "compensated"
    compensation = second.detail["compensation_event_id"]
    shown = admin.get(f"/console/events/{part}").text
    assert "1 of 2 credits refunded; 1 left to refund" in shown
    assert f'href="/console/events/{compensation}"' in shown
    assert (
        f'usage <a href="/console/events/{part}">'
        in admin.get(f"/console/events/{compensation}").text
    )
    assert "refund" in admin.get("/console/audit").text


def test_a_viewer_sees_no_refund_form_and_its_refund_is_refused(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    [event_id] = make_failed(clean_tables, customer="cust_vrefund", message="422: no")
    viewer = signed_in("viewer")
    page = viewer.get(f"/console/events/{event_id}")
    assert "0 of 2 credits refunded" in page.text and "/refund" not in page.text
    answer = viewer.post(
        f"/console/events/{event_id}/refund",
        data={"csrf": csrf_of(page.text), "reason": "try"},
    )
    assert answer.status_code == 403
    assert status_of(clean_tables, event_id) == "failed"
    assert audit_entries(clean_tables, "refund") == []


def test_a_refund_needs_a_reason_a_csrf_token_and_credits_that_are_left(
    signed_in: Callable[[str], TestClient], clean_tables: Engine
) -> None:
    [event_id] = make_failed(clean_tables, customer="cust_brefund", message="422: no")
    admin = signed_in("admin")
    csrf = csrf_of(admin.get(f"/console/events/{event_id}").text)
    before = balance_of(clean_tables, "cust_brefund")
    url = f"/console/events/{event_id}/refund"
    for form, status, message in [
        ({"csrf": csrf}, 422, "a refund needs a reason"),
        ({"csrf": csrf, "reason": "   "}, 422, "a refund needs a reason"),
        ({"csrf": csrf, "reason": "x", "credits": "two"}, 422, "credits must be a whole number"),
        ({"csrf": csrf, "reason": "x", "credits": "3"}, 409, "2 are left to refund; 3 asked"),
        ({"reason": "x"}, 403, "CSRF token is missing"),
        ({"csrf": "forged", "reason": "x"}, 403, "CSRF token is missing"),
    ]:
        answer = admin.post(url, data=form)
        assert (answer.status_code, message in answer.text) == (status, True), form
    assert status_of(clean_tables, event_id) == "failed"
    assert balance_of(clean_tables, "cust_brefund") == before
    assert audit_entries(clean_tables, "refund") == []
