"""Helpers shared by tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
