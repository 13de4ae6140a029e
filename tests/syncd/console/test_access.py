"""Who may reach which route, CSRF on every form, headers, cookies and redirects.

The routes are read from ``app.url_map``: a new route that is not classified
below fails :func:`test_every_route_is_classified`, and every classified route
is tried anonymously, as reception and as a manager.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from flask.testing import FlaskClient
from werkzeug.routing import Rule

from syncd import staff
from syncd.console import CONTENT_SECURITY_POLICY, create_app
from tests.support import FakeClock
from tests.syncd.console.conftest import (
    MANAGER,
    PAPER_FORMS,
    RECEPTION,
    RECEPTION_PASSWORD,
    Console,
    clients_of,
    csrf_token,
)

PUBLIC = {"login", "static"}
STAFF = {"overview", "requests", "new_request", "request_page", "steps", "retention_page",
         "audit", "logout"}
MANAGER_ONLY = {"confirm_step", "extend_request", "cancel_request", "download_export",
                "confirm_purge", "users", "user_action"}
SPARE = "spare"  # the account the user actions act on
SENT = ("GET", "POST")  # HEAD and OPTIONS are answered by Flask for the GET views

# A plausible form for each POST route (the CSRF token is added where a test wants one).
FORMS = {
    "login": {"name": "nobody", "password": "not-the-password"},
    "logout": {},
    "new_request": {"kind": "erase", "client_id": "no-such-client"},
    "confirm_step": {"processor": PAPER_FORMS},
    "extend_request": {"months": "1", "reason": "backlog"},
    "cancel_request": {"reason": "withdrawn"},
    "confirm_purge": {"run_id": "1", "count": "0"},
    "audit": {"lookup": "request", "value": "1"},
    "users": {"name": "newcomer", "role": "reception", "password": "a-long-password"},
    "user_action": {"password": "another-long-password"},
}


@pytest.fixture(scope="module")
def request_id(console: Console) -> int:
    """An open erasure with a manual step, filed by the manager (and an account to act on)."""
    with console.ledger() as ledger:
        staff.add(ledger, SPARE, "reception", "spare-password-1", by=None)
    person = clients_of(console.sandbox)[0]
    filed = console.file(console.manager(), "erase", client_id=person["clientId"])
    assert filed.status_code == 302, filed.text
    return int(filed.headers["Location"].rsplit("/", 1)[1])


def _url(rule: Rule, request_id: int) -> str:
    values = {"request_id": request_id, "name": SPARE, "action": "reset",
              "filename": "console.css"}
    return rule.rule.replace("<int:request_id>", str(request_id)).replace(
        "<name>", values["name"]).replace("<action>", values["action"]).replace(
        "<path:filename>", values["filename"])


def _routes(console: Console, request_id: int) -> list[tuple[str, str, str]]:
    """(endpoint, method, url) of every route of the console."""
    found = []
    for rule in console.app.url_map.iter_rules():
        for method in sorted(set(rule.methods or ()) & set(SENT)):
            found.append((rule.endpoint, method, _url(rule, request_id)))
    return found


def _is_login_redirect(answer) -> bool:  # type: ignore[no-untyped-def]
    return answer.status_code == 302 and urlsplit(answer.headers["Location"]).path == "/login"


def test_every_route_is_classified(console: Console) -> None:
    endpoints = {rule.endpoint for rule in console.app.url_map.iter_rules()}
    assert endpoints == PUBLIC | STAFF | MANAGER_ONLY


def test_anonymous_users_are_sent_to_log_in_and_cannot_post(console: Console,
                                                           request_id: int) -> None:
    before = console.snapshot()
    for endpoint, method, url in _routes(console, request_id):
        if endpoint in PUBLIC:
            continue
        client = console.client()
        if method == "GET":
            answer = client.get(url)
            assert _is_login_redirect(answer), (url, answer.status_code)
        else:
            token = console.token(client)  # a real token of an anonymous session
            for data in (FORMS[endpoint], {"csrf_token": token, **FORMS[endpoint]}):
                answer = client.post(url, data=data)
                assert answer.status_code in (400, 403), (url, data.keys(), answer.status_code)
    assert console.snapshot() == before


def test_reception_is_refused_manager_routes_even_with_a_valid_token(
    console: Console, request_id: int
) -> None:
    client = console.reception()
    before = console.snapshot()
    for endpoint, method, url in _routes(console, request_id):
        if endpoint not in MANAGER_ONLY:
            continue
        if method == "GET":
            answer = client.get(url)
        else:
            answer = console.post(client, url, FORMS[endpoint])
        assert answer.status_code == 403, (url, method, answer.status_code)
        assert "manager" in answer.text
    assert console.snapshot() == before


def test_reception_reaches_the_staff_pages(console: Console, request_id: int) -> None:
    client = console.reception()
    for endpoint, method, url in _routes(console, request_id):
        if endpoint in STAFF and method == "GET":
            assert client.get(url).status_code == 200, url


def test_a_manager_reaches_every_route(console: Console, request_id: int) -> None:
    client = console.manager()
    for endpoint, method, url in _routes(console, request_id):
        if endpoint in PUBLIC or endpoint == "logout":
            continue
        if method == "GET":
            answer = client.get(url)
            if endpoint == "download_export":  # an erasure has no file: the route answers 404
                assert answer.status_code == 404 and "export" in answer.text
                continue
        else:
            answer = console.post(client, url, FORMS[endpoint])
        assert answer.status_code not in (400, 401, 403, 405, 500), (url, method, answer.text)
        assert not _is_login_redirect(answer), url


@pytest.mark.parametrize("how", ["no token", "wrong token", "another session's token"])
def test_every_post_without_this_sessions_token_is_refused_and_changes_nothing(
    console: Console, request_id: int, how: str
) -> None:
    client = console.manager()
    other = console.manager()
    tokens = {"no token": None, "wrong token": "IjAwMDAi.AAAAAA.forged-token-value",
              "another session's token": console.token(other, "/users")}
    before = console.snapshot()
    for endpoint, method, url in _routes(console, request_id):
        if method != "POST":
            continue
        data = dict(FORMS[endpoint])
        if tokens[how] is not None:
            data["csrf_token"] = tokens[how]
        answer = client.post(url, data=data)
        assert answer.status_code == 400, (url, answer.status_code)
        assert "did not come from this console" in answer.text
    assert console.snapshot() == before
    assert client.get("/").status_code == 200  # the refused logout did not log out


def test_security_headers_and_csp_on_every_page(console: Console, request_id: int) -> None:
    pages = [console.client().get("/login"), console.client().get("/"),
             console.client().post("/logout")]
    client = console.manager()
    pages += [client.get(url) for endpoint, method, url in _routes(console, request_id)
              if method == "GET" and endpoint != "static"]
    pages += [client.get("/no/such/page"), client.get("/requests/999999")]
    for page in pages:
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, page.request.path
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Referrer-Policy"] == "same-origin"
        assert page.headers["Cache-Control"] == "no-store"
        assert "script-src" not in page.headers["Content-Security-Policy"]
        assert "Strict-Transport-Security" not in page.headers  # loopback, plain HTTP
        assert "<script" not in page.text


def _cookie(client: FlaskClient) -> str:
    answer = client.get("/login")
    (cookie,) = [c for c in answer.headers.getlist("Set-Cookie") if c.startswith("syncd_console=")]
    return cookie


def test_the_session_cookie_is_httponly_strict_and_not_secure_on_loopback(
    console: Console,
) -> None:
    cookie = _cookie(console.client())
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie


@pytest.mark.parametrize("changes", [{"listen": "0.0.0.0:8788"},
                                     {"listen": "192.0.2.10:8788"},
                                     {"secure_cookies": "on"}], ids=repr)
def test_the_session_cookie_is_secure_off_loopback_or_when_asked(
    console: Console, changes: dict[str, str]
) -> None:
    settings = console.settings.model_copy(update={
        "console": console.settings.console.model_copy(update=changes)})
    app = create_app(lambda: settings, clock=FakeClock())
    answer = app.test_client().get("/login", base_url="https://syncd.example")
    (cookie,) = [c for c in answer.headers.getlist("Set-Cookie") if c.startswith("syncd_console=")]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert answer.headers["Strict-Transport-Security"].startswith("max-age=")


@pytest.mark.parametrize("target", [
    "//evil.example/steal", "https://evil.example/", "http:evil.example", "/\\evil.example",
    "\\\\evil.example", "///evil.example", "javascript:alert(1)", " //evil.example",
    "/%2F%2Fevil.example", "%2F%2Fevil.example", "/\t/evil.example", "/\n/evil.example",
    "/\r\n/evil.example", "/steps\r\nSet-Cookie: x=1", "/steps\x00", "/\x0b/evil.example",
])
def test_login_never_redirects_off_the_site(console: Console, target: str) -> None:
    client = console.client()
    answer = console.try_login(client, MANAGER, "manager-password-1", next=target)
    assert answer.status_code == 302
    location = answer.headers["Location"]
    parts = urlsplit(location)
    assert parts.scheme in ("", "http") and parts.netloc in ("", "localhost"), location
    assert parts.path.startswith("/") and not parts.path.startswith("//"), location
    assert "evil" not in parts.netloc


def test_login_returns_to_the_page_asked_for(console: Console) -> None:
    client = console.client()
    sent = client.get("/steps")
    assert _is_login_redirect(sent)
    target = dict(p.split("=", 1) for p in urlsplit(sent.headers["Location"]).query.split("&"))
    answer = console.try_login(client, RECEPTION, RECEPTION_PASSWORD, next="/steps")
    assert target["next"] in ("/steps", "%2Fsteps")
    assert answer.status_code == 302 and answer.headers["Location"] == "/steps"


@pytest.mark.parametrize("request_part", ["99999999999999999999", str(2**63)])
def test_a_request_id_beyond_the_ledgers_integers_is_not_found(console: Console,
                                                               request_part: str) -> None:
    client = console.reception()
    for suffix in ("", "/export"):
        answer = client.get(f"/requests/{request_part}{suffix}")
        assert answer.status_code == 404, suffix
    manager = console.manager()
    for action, data in (("confirm", FORMS["confirm_step"]), ("extend", FORMS["extend_request"]),
                         ("cancel", FORMS["cancel_request"])):
        answer = console.post(manager, f"/requests/{request_part}/{action}", data)
        assert answer.status_code == 404, action
    assert manager.get(f"/requests/{2**63 - 1}").status_code == 404  # the largest id: looked up


def test_logging_in_over_https_works_with_the_referrer_the_browser_sends(console: Console) -> None:
    """Over HTTPS Flask-WTF also wants a same-site Referer: the console's policy must allow one.

    The browser sends a Referer only as the page's Referrer-Policy allows; the test sends
    what that policy allows, as a browser would.
    """
    settings = console.settings.model_copy(update={
        "console": console.settings.console.model_copy(update={"secure_cookies": "on"})})
    app = create_app(lambda: settings, clock=FakeClock())
    client = app.test_client()
    base = "https://console.clinic.example"
    page = client.get("/login", base_url=base)
    policy = page.headers["Referrer-Policy"]
    assert policy in ("no-referrer", "same-origin", "strict-origin", "strict-origin-when-cross-origin",
                      "origin", "origin-when-cross-origin", "no-referrer-when-downgrade")
    headers = {} if policy == "no-referrer" else {"Referer": f"{base}/login"}
    answer = client.post("/login", base_url=base, headers=headers, data={
        "csrf_token": csrf_token(page.text), "name": MANAGER, "password": "manager-password-1"})
    assert answer.status_code == 302, answer.text
    assert client.get("/", base_url=base).status_code == 200
