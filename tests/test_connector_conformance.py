"""Every registered connector honours the contract in connectors/base.py.

Parametrized over ``connectors.REGISTRY``, so a new connector is checked the
moment it is registered, against the sandbox's emulator of its system. The
reading tests run over the connectors whose system holds a list to read
(``ReadableConnector``); a write-only one (Google Analytics) offers no reads.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

import connectors
from connectors.base import (
    Action,
    Changes,
    ClientRecord,
    Connector,
    MemberRecord,
    ReadableConnector,
)
from syncd import config, engine
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox

KINDS = sorted(connectors.REGISTRY)
READABLE = [kind for kind in KINDS
            if all(callable(getattr(connectors.load(kind), name, None))
                   for name in ("scan", "changes"))]  # fmt: skip
RECORD_TYPES = {"phorest": ClientRecord, "mailchimp": MemberRecord}
VENDORS = {"google_analytics": "google"}  # the sandbox's name, where it differs
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(clients=120, seed=4, smtp_port=None) as running:
        yield running


@pytest.fixture(scope="module")
def settings(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> config.Settings:
    path = tmp_path_factory.mktemp("conformance") / "syncd.toml"
    return config.load(sandbox.write_config(path))


def build(kind: str, section: object) -> Connector:
    return connectors.load(kind)(section, retry=NO_RETRY, sleep=lambda _: None)


def writes(sandbox: Sandbox, kind: str) -> int:
    routes = sandbox.traffic.summary().get(VENDORS.get(kind, kind), {}).get("routes", {})
    return sum(sum(statuses.values()) for route, statuses in routes.items()
               if route.split(" ")[0] in WRITE_METHODS)


@pytest.mark.parametrize("kind", KINDS)
def test_connector_implements_the_protocol_under_its_registered_name(
    kind: str, settings: config.Settings
) -> None:
    connector = build(kind, getattr(settings, kind))
    assert isinstance(connector, Connector)
    assert connector.name == kind
    assert isinstance(connector.apply_batch_size, int) and connector.apply_batch_size >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_check_passes_with_good_credentials_and_fails_without_raising_on_bad(
    kind: str, settings: config.Settings
) -> None:
    section = getattr(settings, kind)
    assert build(kind, section).check().ok
    secret = section.secret_fields()[0]
    wrong = section.model_copy(update={secret: wrong_secret(getattr(section, secret))})
    result = build(kind, wrong).check()
    assert not result.ok and result.detail and result.credentials_refused


def wrong_secret(secret: SecretStr) -> SecretStr:
    """A value of the secret's own form that the vendor refuses.

    A password or API key is replaced; a service-account key gets another private key,
    so it still parses and is refused where Google would refuse it, at the token endpoint.
    """
    try:
        info = json.loads(secret.get_secret_value())
    except ValueError:
        return SecretStr("wrong-value-us1")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()  # fmt: skip
    return SecretStr(json.dumps({**info, "private_key": pem}))


def test_every_processor_the_engine_reconciles_can_be_read() -> None:
    assert set(engine.PROCESSORS) <= set(READABLE)


@pytest.mark.parametrize("kind", KINDS)
def test_a_connector_that_offers_reads_offers_both_and_one_that_does_not_offers_none(
    kind: str, settings: config.Settings
) -> None:
    connector = build(kind, getattr(settings, kind))
    offered = {name for name in ("scan", "changes") if hasattr(connector, name)}
    assert offered in (set(), {"scan", "changes"})
    assert isinstance(connector, ReadableConnector) is (kind in READABLE)


@pytest.mark.parametrize("kind", READABLE)
def test_scan_streams_frozen_records_of_the_connector_kind(kind: str, settings: config.Settings) -> None:
    records = list(build(kind, getattr(settings, kind)).scan())
    assert records and all(isinstance(r, RECORD_TYPES[kind]) for r in records)
    with pytest.raises(dataclasses.FrozenInstanceError):
        records[0].email = "x"  # type: ignore[misc]


@pytest.mark.parametrize("kind", READABLE)
def test_changes_without_a_cursor_is_a_full_read_with_a_cursor_to_continue(
    kind: str, settings: config.Settings
) -> None:
    connector = build(kind, getattr(settings, kind))
    first = connector.changes(None)
    assert isinstance(first, Changes) and first.full and first.cursor
    again = connector.changes(first.cursor)
    assert isinstance(again.cursor, str) and again.cursor >= first.cursor


@pytest.mark.parametrize("kind", KINDS)
def test_apply_answers_every_action_once_in_order_without_raising(
    kind: str, settings: config.Settings
) -> None:
    connector = build(kind, getattr(settings, kind))
    assert connector.apply([]) == []
    actions = [Action("clear_extra_fields" if kind == "phorest" else "withdraw_consent", "k1"),
               Action("erase" if kind == "phorest" else "withdraw_consent", "k2")]
    outcomes = connector.apply(actions)
    assert [o.action for o in outcomes] == actions
    assert all(o.status == "permanent" for o in outcomes)


@pytest.mark.parametrize("kind", KINDS)
def test_dry_run_changes_nothing(kind: str, settings: config.Settings, sandbox: Sandbox) -> None:
    connector = build(kind, getattr(settings, kind))
    if kind == "phorest":
        client = next(r for r in connector.scan() if r.state == "active" and r.email_consent)
        actions = [Action("withdraw_consent", "k", client_id=client.client_id)]
    elif kind == "google_analytics":
        client = next(iter(sandbox.phorest.snapshot_clients()))
        actions = [Action("erase", "k", client_id=client["clientId"], email=client["email"])]
    else:
        member = next(r for r in connector.scan() if r.status == "subscribed")
        actions = [Action("unsubscribe", "k", email=member.email),
                   Action("erase", "k2", email=member.email)]
    before = writes(sandbox, kind)
    outcomes = connector.apply(actions, dry_run=True)
    assert [o.status for o in outcomes] == ["done"] * len(actions)
    assert writes(sandbox, kind) == before


@pytest.mark.parametrize("kind", KINDS)
def test_connector_module_stays_inside_its_boundary(kind: str) -> None:
    module = connectors.REGISTRY[kind].partition(":")[0]
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "(['syncd', 'ledger'], ['syncd', 'daemon'], ['syncd', 'cli'], ['syncd', 'sandbox'])]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parents[1])
