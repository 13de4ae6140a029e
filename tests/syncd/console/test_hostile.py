"""Hostile requests: generated paths, methods and forms never make a 500 or change the ledger.

Three callers: anonymous (no session, no token), a logged-in session without
its token (none, forged, or another session's), and a logged-in session with
its token. Only the last may change anything; none may get a 500.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote_to_bytes

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import staff
from tests.syncd.console.conftest import (
    MANAGER,
    MANAGER_PASSWORD,
    RECEPTION,
    RECEPTION_PASSWORD,
    Console,
    clients_of,
)

EXAMPLES = 1000  # per caller: 3,000 requests, about 30 s for the three together
HOSTILE = settings(max_examples=EXAMPLES, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow])
# GET /retention is left out: it reads every Phorest client (about a second each time);
# the route tests fetch it in every role.
ROUTES = ["/", "/login", "/logout", "/requests", "/requests/new", "/requests/{id}",
          "/requests/{id}/confirm", "/requests/{id}/extend", "/requests/{id}/cancel",
          "/requests/{id}/export", "/steps", "/retention/confirm", "/audit",
          "/users", "/users/{name}/{action}", "/static/{file}"]
TRAVERSALS = ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
              "/static/..%2f..%2fsyncd.toml", "/requests/1/../../users", "/static/%00",
              "/users/..%2f..%2fetc/reset", "//evil.example/", "/requests/1%00/export",
              "/static/console.css%00.html", "/requests/-1", "/requests/99999999999999999999"]
FIELDS = ["csrf_token", "name", "password", "kind", "email", "phone", "client_id",
          "export_format", "note", "processor", "back", "months", "reason", "run_id", "count",
          "lookup", "value", "role"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND"]
NAMES = ["spare", "nobody",  # never the logged-in accounts: a reset would lock them out
         "Spare", "a" * 41, "..", "x%00y"]
ACTIONS = ["disable", "enable", "reset", "role", "delete", "", "..", "DISABLE"]
CHOICES = ["erase", "restrict", "unrestrict", "export", "csv", "json", "manager", "reception",
           "email", "phone", "client_id", "request", "steps", "request", "1", "2", "0", "-1"]

segment = st.text(max_size=12).map(lambda t: quote(t, safe=""))
ids = st.one_of(st.integers(min_value=-5, max_value=10).map(str), segment)


@st.composite
def paths(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["route", "route", "route", "traversal", "random"]))
    if kind == "traversal":
        return draw(st.sampled_from(TRAVERSALS))
    if kind == "random":
        parts = draw(st.lists(st.one_of(segment, st.sampled_from(["..", ".", "%2e%2e"])),
                              max_size=5))
        return "/" + "/".join(parts)
    template = draw(st.sampled_from(ROUTES))
    return template.format(id=draw(ids), name=draw(st.one_of(st.sampled_from(NAMES), segment)),
                           action=draw(st.one_of(st.sampled_from(ACTIONS), segment)),
                           file=draw(st.one_of(st.just("console.css"), segment)))


value = st.one_of(
    st.text(max_size=60),
    st.sampled_from(CHOICES),
    st.integers().map(str),
    st.floats(allow_nan=True).map(str),
    st.text(alphabet="\x00\u202e\ufeff\U0001f600é<>\"'&;", max_size=30),
    st.builds(lambda n, c: c * n, st.sampled_from([300, 5_000, 20_000]), st.sampled_from("xé\x00")),
)
forms = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)),
                        st.one_of(value, st.lists(value, max_size=3)), max_size=8)


def _send(client: FlaskClient, method: str, path: str, form: dict[str, Any]) -> Any:
    # PATH_INFO as a server hands it over (percent-decoded bytes as latin-1): the test
    # client would otherwise read "//host/..." as a URL with a host.
    raw = {"PATH_INFO": unquote_to_bytes(path).decode("latin-1")}
    if method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        return client.open("/", method=method, query_string=_flat(form),
                           environ_overrides=raw)
    return client.open("/", method=method, data=form, environ_overrides=raw)


def _flat(form: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in form.items() if not (isinstance(v, str) and len(v) > 2000)}


class Sessions:
    """Logged-in clients and their tokens, logged in again when a request ended the session."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.clients: dict[str, tuple[FlaskClient, str]] = {}
        self.other_token = console.token(console.client("10.2.0.2"))

    def get(self, role: str) -> tuple[FlaskClient, str]:
        """The role's client and its CSRF token (a page that is not there: 404 when logged in)."""
        known = self.clients.get(role)
        if known is None or known[0].get("/-").status_code != 404:
            name, password = ((MANAGER, MANAGER_PASSWORD) if role == "manager"
                              else (RECEPTION, RECEPTION_PASSWORD))
            client = self.console.login(name, password)
            known = self.clients[role] = (client, self.console.token(client, "/requests/new"))
        return known


@pytest.fixture(scope="module")
def sessions(console: Console) -> Sessions:
    person = clients_of(console.sandbox)[20]
    filed = console.file(console.manager(), "erase", client_id=person["clientId"])
    assert filed.status_code == 302  # request #1: something to confirm, extend or cancel
    with console.ledger() as ledger:
        staff.add(ledger, "spare", "reception", "spare-password-1", by=None)
    console.set_console(address_failures=10_000, lockout_after=100)
    return Sessions(console)


def _no_server_error(answer: Any, method: str, path: str) -> None:
    assert answer.status_code < 500, (method, path, answer.status_code)


@HOSTILE
@given(method=st.sampled_from(METHODS), path=paths(), form=forms)
def test_anonymous_requests_change_nothing(console: Console, sessions: Sessions, method: str,
                                           path: str, form: dict[str, Any]) -> None:
    before = console.snapshot()
    answer = _send(console.client("10.2.0.1"), method, path, form)
    _no_server_error(answer, method, path)
    assert console.snapshot() == before, (method, path)


@HOSTILE
@given(method=st.sampled_from(METHODS), path=paths(), form=forms,
       role=st.sampled_from(["manager", "reception"]),
       token=st.sampled_from(["none", "forged", "other session"]))
def test_a_session_without_its_token_changes_nothing(
    console: Console, sessions: Sessions, method: str, path: str, form: dict[str, Any],
    role: str, token: str,
) -> None:
    client, _token = sessions.get(role)
    form = {k: v for k, v in form.items() if k != "csrf_token"}
    if token == "forged":
        form["csrf_token"] = "ImZvcmdlZCI.aaaaaa.forged-signature"
    elif token == "other session":
        form["csrf_token"] = sessions.other_token
    before = console.snapshot()
    answer = _send(client, method, path, form)
    _no_server_error(answer, method, path)
    assert console.snapshot() == before, (method, path)


@HOSTILE
@given(method=st.sampled_from(METHODS), path=paths(), form=forms,
       role=st.sampled_from(["manager", "reception"]))
def test_a_session_with_its_token_never_gets_a_server_error(
    console: Console, sessions: Sessions, method: str, path: str, form: dict[str, Any],
    role: str,
) -> None:
    client, token = sessions.get(role)
    form = {**form, "csrf_token": token}
    answer = _send(client, method, path, form)
    _no_server_error(answer, method, path)
