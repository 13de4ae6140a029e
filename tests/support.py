"""Helpers shared by tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

DEFAULT_START = datetime(2026, 11, 24, 19, 40, 5, 123456, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand, so nothing ever sleeps."""

    def __init__(self, now: datetime = DEFAULT_START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        """Move the clock forward by ``timedelta(**delta)`` and return the new time."""
        self.now += timedelta(**delta)
        return self.now


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _ThreadedWSGIServer(WSGIServer):
    # Mailchimp delivers from several threads at once; serve each request in a thread.
    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        threading.Thread(
            target=super().process_request, args=(request, client_address), daemon=True
        ).start()


@contextmanager
def serve_wsgi(app: Callable[..., Iterable[bytes]]) -> Iterator[str]:
    """Serve a WSGI app on 127.0.0.1 in the background; yields ``http://127.0.0.1:PORT``."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadedWSGIServer,
                         handler_class=_QuietHandler)  # fmt: skip
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()  # fmt: skip
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def seeded_values(sandbox: Any) -> set[str]:
    """The personal data a sandbox world holds: addresses, names and phones, to grep for.

    Very short names would match unrelated text; addresses and phones always count.
    """
    values: set[str] = set()
    for client in sandbox.phorest.snapshot_clients():
        for name in ("email", "firstName", "lastName", "mobile"):
            if client.get(name):
                values.add(str(client[name]))
    values.update(m["email_address"] for m in sandbox.mailchimp.snapshot_members())
    return {v for v in values if "@" in v or len(v) >= 5}
