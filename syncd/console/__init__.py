"""The manager's console: a web page for requests, manual steps, status and audit.

``syncd run`` serves it on ``[console] listen`` (default ``127.0.0.1:8788``),
a listener of its own so that the Mailchimp webhook can be exposed through a
reverse proxy without the console, with the same production server and
request limits as the other listener (:mod:`syncd.httpd`). Pages are rendered
on the server (Flask and Jinja2); there is no JavaScript.

The console is a front end only: it files, confirms, extends and cancels
requests, confirms a guarded purge and shows status through the same
functions as the command line (:mod:`syncd.desk`, :mod:`syncd.rights`,
:mod:`syncd.retention`, :mod:`syncd.export`, :mod:`syncd.status`,
:mod:`syncd.staff`). The daemon carries the work out; filing wakes it.

Security (:mod:`._auth`): staff accounts with roles (:mod:`syncd.staff`),
signed session cookies (HttpOnly, SameSite=Strict, Secure off loopback unless
configured otherwise), an idle timeout, a CSRF token on every form
(Flask-WTF), login throttling per account and per address, a strict
Content-Security-Policy, and every staff action in the audit trail with the
login name. A client's personal data appears only in the export download and
in the identifier a user typed into the form they are filling.

Layout: :mod:`._auth` (sessions, roles, login), :mod:`._pages` (the pages),
:mod:`._forms` (the forms), ``templates/`` and ``static/``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from flask import Flask, g, render_template
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from syncd.config import Settings
from syncd.console import _auth, _pages
from syncd.ledger import Ledger

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self'; "
                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: over HTTPS Flask-WTF refuses a form without a same-site
    # Referer (WTF_CSRF_SSL_STRICT); other sites still get none.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cache-Control": "no-store",
}
MAX_FORM_BYTES = 16 * 1024  # no form of the console needs more

ERROR_TITLES = {
    400: "The form could not be used", 403: "Not allowed", 404: "Not found",
    405: "Not allowed here", 413: "Too much data", 429: "Too many attempts",
    500: "Something went wrong",
}  # fmt: skip


def create_app(settings: Callable[[], Settings], *, wake: Callable[[], None] = lambda: None,
               clock: Clock | None = None) -> Flask:
    """The console as a WSGI app.

    Args:
        settings: returns the current configuration (it changes on reload).
        wake: asks the daemon to carry out new work now (after a filing).
        clock: returns the current aware UTC time (tests move it).
    """
    app = Flask(__name__)
    console = settings().console
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # a restart ends every session
        SESSION_COOKIE_NAME="syncd_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=console.cookies_secure,
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=console.idle_minutes),
        SESSION_REFRESH_EACH_REQUEST=True,
        MAX_CONTENT_LENGTH=MAX_FORM_BYTES,
        MAX_FORM_MEMORY_SIZE=MAX_FORM_BYTES,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session, which idles out
        WTF_CSRF_SSL_STRICT=console.cookies_secure,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.extensions["syncd"] = {
        "settings": settings, "wake": wake, "clock": clock or (lambda: datetime.now(UTC)),
        "throttle": _auth.AddressThrottle(),
    }
    CSRFProtect(app)
    app.jinja_env.autoescape = True
    app.jinja_env.globals.update(nav=_pages.NAV)
    app.jinja_env.filters["when"] = when
    _auth.register(app)
    _pages.register(app)

    @app.teardown_appcontext
    def _close_ledger(_error: BaseException | None) -> None:
        ledger = g.pop("ledger", None)
        if ledger is not None:
            ledger.close()

    @app.after_request
    def _headers(response: Any) -> Any:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if app.config["SESSION_COOKIE_SECURE"]:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    @app.errorhandler(CSRFError)
    def _csrf(error: CSRFError) -> Any:
        return _error_page(400, "The form had expired or did not come from this console. "
                           "Go back, reload the page and try again.")

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Any:
        code = error.code or 500
        return _error_page(code, _pages.plain(error.description or ""))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Any:
        # The type only: a message may quote what a vendor or a form sent.
        log.error("console_error", error=type(error).__name__)
        return _error_page(500, "The console could not do this. It was logged; try again, "
                           "or tell whoever runs the server.")

    return app


def ledger() -> Ledger:
    """This request's ledger connection (opened on first use, closed after the request)."""
    if "ledger" not in g:
        g.ledger = Ledger.open(current_settings().ledger.path)
    return g.ledger


def current_settings() -> Settings:
    """The configuration in force."""
    from flask import current_app

    return current_app.extensions["syncd"]["settings"]()


def now() -> datetime:
    """The console's clock."""
    from flask import current_app

    return current_app.extensions["syncd"]["clock"]()


def when(moment: datetime | str | None, seconds: bool = False) -> str:
    """A time as staff read it: ``2026-12-03 16:06 UTC`` (``-`` for none)."""
    if not moment:
        return "-"
    if isinstance(moment, str):
        try:
            moment = datetime.fromisoformat(moment)
        except ValueError:
            return moment
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if seconds else f"{moment:%Y-%m-%d %H:%M} UTC"


def _error_page(code: int, message: str) -> Any:
    title = ERROR_TITLES.get(code, "Error")
    return render_template("error.html", code=code, title=title, message=message), code
