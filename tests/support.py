"""Helpers shared by tests."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
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


# --- the shared-address rule, modelled independently of syncd -------------------------

DEAD_TIER = "dead"


@dataclass
class Address:
    """Every Phorest record at one address and the member there, as the vendors' APIs show.

    ``records`` are raw Phorest client objects; the rule of the shared-address
    issue decides which of them govern (active, else archived, else dead).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    member: dict[str, Any] | None = None

    @property
    def tier(self) -> str | None:
        tiers = [_tier(r) for r in self.records]
        for tier in ("active", "archived", DEAD_TIER):
            if tier in tiers:
                return tier
        return None

    @property
    def governing(self) -> list[dict[str, Any]]:
        return sorted((r for r in self.records if _tier(r) == self.tier),
                      key=lambda r: (r.get("createdAt") or "~", r["clientId"]))

    @property
    def live(self) -> list[dict[str, Any]]:
        return [r for r in self.records if _tier(r) != DEAD_TIER]

    @property
    def consent(self) -> bool:
        governing = self.governing
        return bool(governing) and all(r.get("emailMarketingConsent") is True for r in governing)

    @property
    def marketed(self) -> bool:
        return self.member is not None and self.member["status"] in ("subscribed", "pending")


def _tier(raw: dict[str, Any]) -> str:
    if raw.get("mergedToClientId") or raw.get("deleted") is True:
        return DEAD_TIER
    return "archived" if raw.get("archived") is True else "active"


def vendor_addresses(sandbox: Any) -> dict[str, Address]:
    """Read both vendors through their own HTTP APIs and group by normalised address."""
    import requests

    c = sandbox.credentials
    base = sandbox.base_url
    addresses: dict[str, Address] = {}
    with requests.Session() as http:
        url = f"{base}/third-party-api-server/api/business/{c.phorest_business_id}/client"
        page = 0
        while True:
            body = http.get(url, params={"page": page, "size": 200, "includeArchived": "true",
                                         "includeDeleted": "true"},
                            auth=(c.phorest_username, c.phorest_password), timeout=30).json()
            for raw in body.get("_embedded", {}).get("clients", []):
                if raw.get("email"):
                    addresses.setdefault(raw["email"].strip().lower(), Address()).records.append(raw)
            page += 1
            if page >= body["page"]["totalPages"]:
                break
        offset = 0
        url = f"{base}/3.0/lists/{c.mailchimp_list_id}/members"
        while True:
            body = http.get(url, params={"count": 1000, "offset": offset},
                            auth=("syncd", c.mailchimp_api_key), timeout=30).json()
            for raw in body["members"]:
                addresses.setdefault(raw["email_address"].strip().lower(),
                                     Address()).member = raw
            offset += 1000
            if offset >= body["total_items"]:
                break
    return addresses


def shared_address_violations(
    addresses: dict[str, Address], *, compliance_waits: bool = False
) -> list[str]:
    """Where the vendors break the shared-address rule (client ids only, no addresses).

    - a member is marketed though a governing record lacks consent, the
      governing records are dead, or no record holds the address;
    - an address whose governing records are active and all consent has no
      subscribed member;
    - a subscribed member's names are not the name source's (created first).

    With ``compliance_waits``, a consenting address whose member is in
    Mailchimp's compliance state (unsubscribed or cleaned) is not missing:
    Mailchimp refuses to re-subscribe it through the API, so it waits for the
    person (R2, ``needs_client_resubscribe``). A fresh resync never leaves one:
    it reads such a member as an opt-out and withdraws the consent.
    """
    problems = []
    for address in addresses.values():
        ids = ",".join(r["clientId"] for r in address.records) or "-"
        if address.marketed and (not address.consent or address.tier in (None, DEAD_TIER)):
            problems.append(f"marketed without every governing record's consent: {ids}")
        waits = compliance_waits and address.member is not None and address.member["status"] in (
            "unsubscribed", "cleaned")
        if address.tier == "active" and address.consent and not waits and not (
            address.member is not None and address.member["status"] == "subscribed"
        ):
            problems.append(f"consenting active address missing from the audience: {ids}")
        if address.consent and address.member is not None and address.member["status"] == "subscribed":
            source = address.governing[0]
            fields = address.member.get("merge_fields", {})
            if (fields.get("FNAME"), fields.get("LNAME")) != (
                (source.get("firstName") or "").strip(), (source.get("lastName") or "").strip()
            ):
                problems.append(f"names not from the name source: {ids}")
    return problems


@dataclass
class Wired:
    """A sandbox wired to syncd as the daemon wires it (see :func:`wired_sandbox`)."""

    ledger: Any
    ledger_path: Any
    live: dict[str, Any]
    keys: Any


@contextmanager
def wired_sandbox(sandbox: Any, tmp_path: Any,
                  sleep: Callable[[float], None] | None = None) -> Iterator[Wired]:
    """The real connectors, a ledger file, and syncd's webhook app registered with Mailchimp.

    Mailchimp's deliveries land in the ledger's inbox, as the daemon's listener
    records them; the caller processes the inbox.
    """
    import connectors
    from syncd import config
    from syncd.identity import SubjectKeys
    from syncd.inbox import recorder
    from syncd.ledger import Ledger
    from syncd.web import WEBHOOK_PREFIX, mailchimp_webhook_app

    ledger_path = tmp_path / "ledger.sqlite3"
    settings = config.load(sandbox.write_config(tmp_path / "syncd.toml", ledger_path=ledger_path))
    assert settings.identity.hmac_key is not None
    assert settings.mailchimp.webhook_secret is not None
    keys = SubjectKeys(settings.identity.hmac_key.get_secret_value().encode(),
                       settings.identity.default_phone_region)
    secret = settings.mailchimp.webhook_secret.get_secret_value()
    options = {} if sleep is None else {"sleep": sleep}
    live = {kind: connectors.load(kind)(getattr(settings, kind), **options)
            for kind in ("phorest", "mailchimp")}  # fmt: skip
    with serve_wsgi(mailchimp_webhook_app(secret, recorder(ledger_path))) as base:
        sandbox.mailchimp.add_webhook(f"{base}{WEBHOOK_PREFIX}{secret}", validate=True)
        with Ledger.open(ledger_path) as ledger:
            yield Wired(ledger, ledger_path, live, keys)


# --- the real daemon and CLI as subprocesses against a sandbox --------------------------

SYNCD = Path(sys.executable).with_name("syncd")
CLI_TIMEOUT_SECONDS = 120


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(done: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``done`` until it is true; fail after ``seconds`` (a hang guard, not a speed check)."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def syncd_cli(config_path: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``syncd --config PATH ARGS…`` as a subprocess, without the caller's SYNCD_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env.update(extra_env)
    return subprocess.run([str(SYNCD), "--config", str(config_path), *args],
                          capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_SECONDS,
                          check=False)  # fmt: skip


@dataclass
class Running:
    """A ``syncd run`` subprocess and the sandbox it works against.

    The sd_notify socket is read all the time on a thread: the kernel queues only a few
    datagrams (``net.unix.max_dgram_qlen``, 10 by default), and a daemon that lives
    through more polls than that would block on its next ``STATUS=`` line.
    """

    sandbox: Any
    config_path: Path
    process: subprocess.Popen[str]
    port: int
    notify: socket.socket
    log_path: Path
    console_port: int = 0
    _received: list[str] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        threading.Thread(target=self._drain, name="sd-notify-reader", daemon=True).start()

    def _drain(self) -> None:
        while self.notify.fileno() != -1:
            try:
                ready, _, _ = select.select([self.notify], [], [], 0.1)
                if ready:
                    message = self.notify.recv(4096).decode()
                    with self._lock:
                        self._received.append(message)
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError):  # closed under us: the daemon's world is gone
                return

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def notifications(self) -> list[str]:
        """The sd_notify messages received since the last call, oldest first."""
        with self._lock:
            found, self._received[:] = list(self._received), []
        return found

    def hook(self) -> str:
        """The daemon's Mailchimp webhook URL (secret path included)."""
        from syncd import config
        from syncd.web import WEBHOOK_PREFIX

        secret = config.load(self.config_path).mailchimp.webhook_secret  # type: ignore[union-attr]
        assert secret is not None
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PREFIX}{secret.get_secret_value()}"


# Alerts are checked every second, and a processor counts as down after 3 s.
ALERT_ENV = {"SYNCD_DAEMON__ALERT_CHECK_SECONDS": "1",
             "SYNCD_ALERTS__PROCESSOR_DOWN_MINUTES": "0.05"}


def start_daemon(config_path: Path, port: int, notify_path: Path, log_path: Path,
                 **extra_env: str) -> subprocess.Popen[str]:
    """Start ``syncd run`` (logging to ``log_path``, telling systemd on ``notify_path``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env.update(SYNCD_DAEMON__LISTEN=f"127.0.0.1:{port}", NOTIFY_SOCKET=str(notify_path),
               SYNCD_CONSOLE__LISTEN=f"127.0.0.1:{free_port()}", **ALERT_ENV)
    env.update(extra_env)
    return subprocess.Popen(
        [str(SYNCD), "--config", str(config_path), "--log-level", "info", "run"],
        stdout=log_path.open("a"), stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


@contextmanager
def started_daemon(tmp_path: Path, *, clients: int, seed: int,
                   healthy_within_seconds: float = 30, extra_toml: str = "",
                   until_healthy: bool = True) -> Iterator[Running]:
    """``syncd run`` against a fresh sandbox, once it said READY=1 and /healthz is 200.

    ``extra_toml`` is appended to the written configuration (e.g. ``[[manual_processors]]``).
    With ``until_healthy=False`` it is enough that the first full resync finished:
    /healthz also waits for GA's first check, a poll interval after the start.
    """
    from syncd.health import LAST_RESYNC_CURSOR
    from syncd.sandbox.app import Sandbox

    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    with Sandbox(clients=clients, seed=seed, smtp_port=0) as sandbox:
        config_path = sandbox.write_config(tmp_path / "syncd.toml")
        if extra_toml:
            with config_path.open("a") as fh:
                fh.write("\n" + extra_toml)
        port, console_port, log_path = free_port(), free_port(), tmp_path / "daemon.log"
        process = start_daemon(config_path, port, notify_path, log_path,
                               SYNCD_CONSOLE__LISTEN=f"127.0.0.1:{console_port}")
        run = Running(sandbox, config_path, process, port, notify, log_path, console_port)
        try:
            seen: list[str] = []
            wait_for(lambda: seen.extend(run.notifications()) or any("READY=1" in m for m in seen),
                     30, "READY=1")
            # Ready comes before the first poll (a full resync); healthy once both were reached.
            if until_healthy:
                wait_for(lambda: run.get("/healthz")[0] == 200, healthy_within_seconds,
                         "/healthz to turn 200")
            else:
                wait_for(lambda: _cursor(config_path, LAST_RESYNC_CURSOR) is not None,
                         healthy_within_seconds, "the first full resync")
            yield run
        finally:
            # A test may have restarted the daemon: stop the one running now, too.
            for started in {id(p): p for p in (process, run.process)}.values():
                if started.poll() is None:
                    started.kill()
                    started.wait()
            notify.close()


def _cursor(config_path: Path, name: str) -> str | None:
    """A ledger cursor, read without creating or migrating anything (None if not there yet)."""
    import sqlite3
    from contextlib import closing

    from syncd import config

    path = config.load(config_path).ledger.path
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            row = db.execute("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone()
    except sqlite3.OperationalError:  # no file, or no table yet
        return None
    return None if row is None else str(row[0])
