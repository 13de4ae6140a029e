"""Propagation latency: how long an opt-out takes to reach the other system.

Two measurements against an in-process sandbox (real HTTP on 127.0.0.1, a real
SQLite ledger, the real connectors built from the sandbox's own config), each
over ``--events`` opt-outs, printed as JSON with p50, p95 and max:

1. Mailchimp -> Phorest: a subscriber clicks unsubscribe in the emulator, the
   emulator delivers the audience webhook to syncd's webhook app, and a worker
   that wakes on each recorded event (as the daemon's does) runs
   :func:`syncd.inbox.process_inbox` and :func:`syncd.tasks.run_due`. Measured
   from the click to the moment the Phorest client reads
   ``emailMarketingConsent=false``. Events are one at a time.
2. Phorest -> Mailchimp: staff switch consent off in Phorest at random moments
   spread over three poll intervals, while a loop runs :func:`syncd.engine.poll`
   every ``--poll-interval`` seconds (as the daemon's schedule does). Measured
   from the Phorest change to the member reading ``unsubscribed``. The target is
   p95 <= poll interval + 2 s.

The poll interval here defaults to 10 s (the configured default is 60 s) so the
run takes about a minute; the figure that matters is the excess over the interval.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import connectors
from connectors.base import Connector
from syncd import config, engine, log
from syncd.inbox import process_inbox, recorder
from syncd.ledger import Ledger
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox
from syncd.tasks import run_due
from syncd.web import WEBHOOK_PREFIX, mailchimp_webhook_app

POLL_TIMEOUT_SECONDS = 60


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *_: Any) -> None:  # no access log (it would name nothing, but is noise)
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3_000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=10.0)
    parser.add_argument("--latency-ms", type=float, default=20)
    args = parser.parse_args()
    log.configure("warning", "json")
    with tempfile.TemporaryDirectory() as tmp, Sandbox(
        clients=args.clients, seed=7, smtp_port=None, latency_ms=args.latency_ms
    ) as sandbox:
        world = _World(sandbox, Path(tmp))
        try:
            engine.resync(None, world.ledger, world.live, world.keys, policy=world.policy)
            webhook = world.webhook_to_phorest(args.events)
            polled = world.phorest_to_mailchimp(args.events, args.poll_interval)
        finally:
            world.close()
    print(json.dumps({
        "clients": args.clients,
        "latency_ms": args.latency_ms,
        "mailchimp_webhook_to_phorest_ms": webhook,
        "phorest_to_mailchimp_by_poll_ms": {**polled, "poll_interval_s": args.poll_interval,
                                             "target_p95_ms": (args.poll_interval + 2) * 1000},
    }, indent=2))


class _World:
    def __init__(self, sandbox: Sandbox, tmp: Path) -> None:
        self.sandbox = sandbox
        self.ledger_path = tmp / "ledger.sqlite3"
        self.settings = config.load(sandbox.write_config(tmp / "syncd.toml",
                                                         ledger_path=self.ledger_path))
        assert self.settings.mailchimp.webhook_secret is not None
        self.keys = engine.subject_keys(self.settings)
        self.live: dict[str, Connector] = {
            kind: connectors.load(kind)(getattr(self.settings, kind))
            for kind in ("phorest", "mailchimp")
        }
        self.policy = RetryPolicy()
        self.ledger = Ledger.open(self.ledger_path)
        self.arrived = threading.Event()
        self.webhook_secret = self.settings.mailchimp.webhook_secret.get_secret_value()
        self.server = make_server("127.0.0.1", 0, mailchimp_webhook_app(
            self.webhook_secret, recorder(self.ledger_path, self.arrived.set)), server_class=_Server, handler_class=_Quiet)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self.server.server_port}{WEBHOOK_PREFIX}{self.webhook_secret}"
        sandbox.mailchimp.add_webhook(url, validate=True)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.ledger.close()

    def _subscribed(self, count: int) -> list[tuple[str, str]]:
        found = []
        for client in self.sandbox.phorest.snapshot_clients():
            email = client.get("email")
            if not email or not client.get("emailMarketingConsent") or client.get("archived"):
                continue
            member = self.sandbox.mailchimp.member(email)
            if member and member["status"] == "subscribed":
                found.append((client["clientId"], email))
        if len(found) < count:
            raise SystemExit(f"only {len(found)} subscribed clients; raise --clients")
        return found

    def webhook_to_phorest(self, events: int) -> dict[str, float]:
        """Click unsubscribe, one event at a time; a worker wakes on each arrival."""
        chosen = self._subscribed(2 * events)[:events]
        stop = threading.Event()

        def worker() -> None:
            with Ledger.open(self.ledger_path) as own:
                while not stop.is_set():
                    if not self.arrived.wait(0.5):
                        continue
                    self.arrived.clear()
                    process_inbox(own, self.live["phorest"], self.keys,  # type: ignore[arg-type]
                                  now=datetime.now(UTC))
                    run_due(own, {"phorest": self.live["phorest"]}, self.policy, self.keys,
                            now=datetime.now(UTC))

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        timings = []
        try:
            for client_id, email in chosen:
                started = time.perf_counter()
                self.sandbox.mailchimp.click_unsubscribe(email)
                timings.append(_until(lambda c=client_id: not self._consent(c), started))
        finally:
            stop.set()
            thread.join()
        return _summary(timings)

    def phorest_to_mailchimp(self, events: int, interval: float) -> dict[str, float]:
        """Consent switched off at random moments while the poll loop runs."""
        chosen = self._subscribed(events)[-events:]
        rng = random.Random(3)
        offsets = sorted(rng.uniform(0, 3 * interval) for _ in chosen)
        stop = threading.Event()
        engine.poll(self.ledger, self.live, self.keys, policy=self.policy)  # cursors are set

        def loop() -> None:
            with Ledger.open(self.ledger_path) as own:
                while not stop.wait(interval):
                    engine.poll(own, self.live, self.keys, policy=self.policy)

        changed: dict[str, float] = {}
        arrived: dict[str, float] = {}
        lock = threading.Lock()

        def watch() -> None:
            while not stop.is_set():
                with lock:
                    waiting = [e for e in changed if e not in arrived]
                for email in waiting:
                    if self._member_status(email) == "unsubscribed":
                        arrived[email] = time.perf_counter()
                time.sleep(0.005)

        threads = [threading.Thread(target=f, daemon=True) for f in (loop, watch)]
        for thread in threads:
            thread.start()
        t0 = time.perf_counter()
        try:
            for offset, (client_id, email) in zip(offsets, chosen):
                time.sleep(max(0.0, t0 + offset - time.perf_counter()))
                self.sandbox.phorest.edit_client(client_id, emailMarketingConsent=False)
                with lock:
                    changed[email] = time.perf_counter()
            deadline = time.perf_counter() + interval + POLL_TIMEOUT_SECONDS
            while len(arrived) < len(changed):
                if time.perf_counter() > deadline:
                    raise SystemExit(f"{len(changed) - len(arrived)} opt-outs never arrived")
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        return _summary([(arrived[e] - changed[e]) * 1000 for e in changed])

    def _consent(self, client_id: str) -> bool:
        client = self.sandbox.phorest.client(client_id)
        return bool(client and client.get("emailMarketingConsent"))

    def _member_status(self, email: str) -> str | None:
        member = self.sandbox.mailchimp.member(email)
        return member["status"] if member else None


def _until(done: Callable[[], bool], started: float) -> float:
    """Milliseconds from ``started`` until ``done()`` holds (checked every 5 ms)."""
    deadline = started + POLL_TIMEOUT_SECONDS
    while not done():
        if time.perf_counter() > deadline:
            raise SystemExit(f"not propagated within {POLL_TIMEOUT_SECONDS} s")
        time.sleep(0.005)
    return (time.perf_counter() - started) * 1000


def _summary(timings_ms: list[float]) -> dict[str, float]:
    return {
        "events": len(timings_ms),
        "p50": round(statistics.median(timings_ms), 1),
        "p95": round(statistics.quantiles(timings_ms, n=20, method="inclusive")[-1], 1),
        "max": round(max(timings_ms), 1),
    }


if __name__ == "__main__":
    main()
