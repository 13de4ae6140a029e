"""The console against an in-process sandbox: one world per test module, Flask's test client.

The sandbox serves real HTTP on loopback and the console reaches it through the
connectors, as ``syncd run`` does. Each module gets its own ledger, its own
configuration (``sandbox.write_config``) and its own app, with a clock the
tests move; the accounts are made with :func:`syncd.staff.add`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from flask import Flask
from flask.testing import FlaskClient

from syncd import config, staff
from syncd.config import Settings
from syncd.console import create_app
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox
from tests.support import FakeClock


MANAGER, MANAGER_PASSWORD = "boss", "manager-password-1"
RECEPTION, RECEPTION_PASSWORD = "desk", "reception-password-1"
PAPER_FORMS = "paper_forms"
MANUAL_PROCESSORS = f"""
[[manual_processors]]
name = "{PAPER_FORMS}"
instructions = "Shred the paper consultation forms in the locked cabinet"
"""
_CSRF = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')
# The real parameters cost ~0.1 s a hash; the console tests log in hundreds of times.
_CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    # 200 clients: five households share addresses (household.<n>@…), two of them active pairs.
    with Sandbox(clients=200, seed=1, smtp_port=None) as world:
        yield world


@pytest.fixture(scope="module", autouse=True)
def _cheap_hashes() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(staff, "_hasher", _CHEAP)
        patch.setattr(staff, "_DUMMY_HASH", _CHEAP.hash("not a password of anyone's"))
        yield


def csrf_token(html: str) -> str:
    """The CSRF token of the first form in ``html``."""
    found = _CSRF.search(html)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


@dataclass
class Console:
    """A console app over its own ledger, and helpers to drive it."""

    sandbox: Sandbox
    settings: Settings
    clock: FakeClock
    app: Flask = field(init=False)

    def __post_init__(self) -> None:
        self.app = create_app(lambda: self.settings, clock=self.clock)

    @property
    def ledger_path(self) -> Path:
        return Path(self.settings.ledger.path)

    def ledger(self) -> Ledger:
        return Ledger.open(self.ledger_path)

    def set_console(self, **changes: Any) -> None:
        """Change ``[console]`` settings (the app reads them on each request)."""
        console = self.settings.console.model_copy(update=changes)
        self.settings = self.settings.model_copy(update={"console": console})

    def client(self, address: str = "127.0.0.1") -> FlaskClient:
        client = self.app.test_client()
        client.environ_base["REMOTE_ADDR"] = address
        return client

    def token(self, client: FlaskClient, path: str = "/login") -> str:
        page = client.get(path)
        assert page.status_code == 200, (path, page.status_code)
        return csrf_token(page.text)

    def try_login(self, client: FlaskClient, name: str, password: str, **query: str) -> Any:
        token = self.token(client)
        return client.post("/login", query_string=query,
                           data={"csrf_token": token, "name": name, "password": password})

    def login(self, name: str, password: str, address: str = "127.0.0.1") -> FlaskClient:
        client = self.client(address)
        answer = self.try_login(client, name, password)
        assert answer.status_code == 302, answer.text
        return client

    def manager(self) -> FlaskClient:
        return self.login(MANAGER, MANAGER_PASSWORD)

    def reception(self) -> FlaskClient:
        return self.login(RECEPTION, RECEPTION_PASSWORD)

    def post(self, client: FlaskClient, path: str, data: dict[str, Any],
             form_page: str = "/requests/new", **options: Any) -> Any:
        """POST with this session's CSRF token (read from ``form_page``)."""
        return client.post(path, data={"csrf_token": self.token(client, form_page), **data},
                           **options)

    def file(self, client: FlaskClient, kind: str, **identifiers: str) -> Any:
        return self.post(client, "/requests/new", {"kind": kind, **identifiers})

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's rows: what the ledger holds, to compare before and after."""
        with closing(sqlite3.connect(self.ledger_path)) as db:
            tables = [row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)
                    for t in tables}

    def audit(self, action: str | None = None) -> list[Any]:
        with self.ledger() as ledger:
            events = ledger.find_audit(limit=100_000)
        return [e for e in events if action is None or e.action == action]


@pytest.fixture(scope="module")
def console(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Console:
    directory = tmp_path_factory.mktemp("console")
    path = sandbox.write_config(directory / "syncd.toml", ledger_path=directory / "ledger.sqlite3")
    with path.open("a") as fh:
        fh.write(MANUAL_PROCESSORS)
    settings = config.load(path)
    with Ledger.open(settings.ledger.path) as ledger:
        staff.add(ledger, MANAGER, "manager", MANAGER_PASSWORD, by=None)
        staff.add(ledger, RECEPTION, "reception", RECEPTION_PASSWORD, by=None)
    return Console(sandbox, settings, FakeClock())


def clients_of(sandbox: Sandbox) -> list[dict[str, Any]]:
    """The sandbox's active clients with an email, a mobile and no shared address."""
    everyone = sandbox.phorest.snapshot_clients()
    emails = [c.get("email") for c in everyone]
    return [c for c in everyone
            if c.get("email") and c.get("mobile") and emails.count(c["email"]) == 1
            and not (c.get("archived") or c.get("deleted") or c.get("mergedToClientId"))]
