"""Screenshots of every console page into docs/console/ (what an operator sees).

Seeds a scratch PostgreSQL database with a small demo (customers, delivered usage spread over
the last hour, events Polar refused, a replay, a grant, a webhook, a reconcile run against the
local Polar emulator), serves the app, signs in with Playwright in Debian's Chromium and
takes one PNG per page. The database is dropped at the end.

    python scripts/console_screenshots.py [--out docs/console]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
import uvicorn
from sqlalchemy import text, update
from sqlalchemy.orm import sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polar_emulator  # noqa: E402
from api.app import create_app  # noqa: E402
from outbox import audit  # noqa: E402
from outbox.db import make_engine, session_scope  # noqa: E402
from outbox.delivery.deliverer import Deliverer, drain  # noqa: E402
from outbox.ledger import grant_credits, record_usage  # noqa: E402
from outbox.migrate import upgrade  # noqa: E402
from outbox.models import OutboxEvent, utcnow  # noqa: E402
from outbox.ops import reconcile_runs  # noqa: E402
from outbox.ops.replay import replay  # noqa: E402
from outbox.polar.gateway import PolarGateway  # noqa: E402
from outbox.polar.ratelimit import LocalRateBudget  # noqa: E402
from outbox.refunds import refund_by  # noqa: E402
from outbox.service_state import record_drain  # noqa: E402
from outbox.settings import Settings, load_settings  # noqa: E402
from outbox.tokens import create_token  # noqa: E402
from outbox.webhooks import receive_webhook  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BASE_URL = os.environ.get(
    "SCREENSHOT_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def seed(
    engine: sa.Engine, settings: Settings, emulator: polar_emulator.RunningEmulator
) -> dict[str, int]:
    rng = random.Random(4)
    customers = ["acme_corp", "globex_42", "initech", "umbrella-eu", "hooli"]
    with session_scope(engine) as session:
        for c in customers:
            grant_credits(session, c, 5000, reason="Pro plan, monthly credits")
        for n in range(400):
            record_usage(
                session,
                rng.choice(customers),
                rng.randint(1, 9),
                {
                    "model": rng.choice(["gpt-4o", "claude-sonnet", "llama-3"]),
                    "request": f"req_{n}",
                },
            )
    deliverer = Deliverer(
        sessionmaker(bind=engine, expire_on_commit=False),
        PolarGateway(settings, budget=LocalRateBudget(100_000)),
        settings,
        worker_id="worker-7f9c:12",
    )
    drain(deliverer, max_seconds=20)
    # Spread the deliveries over the last hour, as a day of traffic would be.
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox_events SET created_at = now() - (id % 60) * interval '1 minute' "
                "- interval '2 seconds', delivered_at = now() - (id % 60) * interval '1 minute' "
                "- interval '1 second' * (random() * 1.5) WHERE status = 'delivered'"
            )
        )
    # Events Polar refuses: a customer unknown to Polar, and a metadata value it rejects.
    emulator.configure(reject_customers=["wayne_ent"])
    with session_scope(engine) as session:
        grant_credits(session, "wayne_ent", 200, reason="trial")
        for _ in range(6):
            record_usage(session, "wayne_ent", 3, {"model": "gpt-4o"})
        grant_credits(
            session, "<script>alert(1)</script>", 50, reason="a hostile id, shown as text"
        )
        record_usage(session, "<script>alert(1)</script>", 2, {"note": "<b>not bold</b>"})
    drain(deliverer, max_seconds=20)
    with session_scope(engine) as session:
        failed = session.scalars(
            sa.select(OutboxEvent.id).where(OutboxEvent.status == "failed")
        ).all()
    replayed = failed[:1]
    with session_scope(engine) as session:
        replay(
            session,
            event_ids=list(replayed),
            actor="console: token 1 (alice)",
            reason="testing the replay path",
        )
    drain(deliverer, max_seconds=5)
    with session_scope(engine) as session:
        grant_credits(session, "globex_42", 1000, reason="goodwill: outage on Dec 3")
        audit.record(
            session,
            actor="console: token 1 (alice)",
            action=audit.GRANT,
            reason="goodwill: outage on Dec 3",
            detail={"customer_id": "globex_42", "credits": 1000},
        )
        refund_by(
            session,
            replayed[0],
            1,
            reason="half of the answer was cut off",
            actor="console: token 1 (alice)",
            settings=settings,
        )
        record_drain(session, "worker-7f9c:12", 10)
        record_drain(session, "worker-a1b2:9", 4)
        payload = {
            "type": "benefit_grant.cycled",
            "timestamp": "2026-12-01T00:00:00Z",
            "data": {
                "id": "grant_8d1f",
                "is_granted": True,
                "is_revoked": False,
                "benefit": {"type": "meter_credit", "properties": {"meter_id": "m", "units": 5000}},
                "customer": {"id": "polar_cus_1", "external_id": "acme_corp", "name": "Acme"},
                "properties": {
                    "last_credited_meter_id": "m",
                    "last_credited_units": 5000,
                    "last_credited_at": "2026-12-01T00:00:00Z",
                },
            },
        }
        receive_webhook(
            session, webhook_id=b"msg_2Xk9", body=json.dumps(payload).encode(), settings=settings
        )
        run_id = reconcile_runs.start_run(
            session,
            actor="console: token 1 (alice)",
            since=utcnow() - timedelta(hours=2),
            until=None,
            customer_id=None,
            fix=False,
            reason=None,
        )
    reconcile_runs.execute_run(sessionmaker(bind=engine), settings, run_id)
    with session_scope(engine) as session:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(failed))
            .values(updated_at=utcnow() - timedelta(minutes=42))
        )
    return {"event": failed[-1], "replayed": replayed[0], "run": run_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "console"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    name = f"outbox_screens_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(BASE_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(BASE_URL).set(database=name).render_as_string(hide_password=False)
    emulator = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=3))
    try:
        upgrade(url)
        settings = load_settings(
            database_url=url,
            polar_access_token=emulator.token,
            polar_base_url=emulator.url,
            outbox_clock_margin_seconds=0,
            outbox_backoff_base_seconds=0.05,
            redis_url=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/7"),
        )
        engine = make_engine(url)
        ids = seed(engine, settings, emulator)
        with session_scope(engine) as session:
            token, _ = create_token(session, "admin", name="alice")
        app = create_app(settings, engine=engine)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        pages = {
            "login": "/console/login",
            "overview": "/console",
            "failed": "/console/failed",
            "replay-preview": "/console/replay/preview?message=" + "",
            "events": "/console/events",
            "event": f"/console/events/{ids['replayed']}",
            "customers": "/console/customers?q=",
            "customer": "/console/customers/globex_42",
            "reconcile": "/console/reconcile",
            "reconcile-run": f"/console/reconcile/{ids['run']}",
            "webhooks": "/console/webhooks",
            "audit": "/console/audit",
        }
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(base_url=base, viewport={"width": 1280, "height": 800})
            page.goto("/console/login")
            page.screenshot(path=str(out / "login.png"))
            page.get_by_label("Token").fill(token)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", name="Overview").wait_for()
            failed_page = page.goto("/console/failed")
            assert failed_page is not None
            for shot, path in pages.items():
                if shot == "login":
                    continue
                if shot == "replay-preview":
                    page.goto("/console/failed")
                    page.locator("table.groups tr", has_text="wayne_ent").get_by_role(
                        "button"
                    ).click()
                    page.get_by_role("heading", name="Replay: what will happen").wait_for()
                elif shot == "customers":
                    page.goto("/console/customers?q=g")
                else:
                    page.goto(path)
                page.screenshot(path=str(out / f"{shot}.png"), full_page=True)
                print(f"{out / shot}.png")
            browser.close()
        server.should_exit = True
        thread.join(10)
        engine.dispose()
    finally:
        emulator.stop()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    main()
