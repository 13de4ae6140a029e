"""Logging in and out, sessions, roles and login throttling.

A session holds the login name, the time of the last request and a marker of
the account's password; every request re-reads the account from the ledger,
so disabling an account, changing its role or resetting its password takes
effect at once. A session idle for ``[console] idle_minutes`` ends.

Throttling: the account side is :func:`syncd.staff.login` (``lockout_after``
wrong passwords in a row lock it, audited); this module adds a per-address
limit (``address_failures`` failures within ``lockout_minutes``), kept in
memory, under which the address gets 429 until the window passes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

import structlog
from flask import Flask, abort, flash, g, redirect, render_template, request, session, url_for

from syncd import staff
from syncd.ledger import StaffMember

log = structlog.get_logger(__name__)

PUBLIC_ENDPOINTS = frozenset({"login", "static"})
MANAGER = "manager"


class AddressThrottle:
    """Failed logins per client address within a sliding window (thread-safe)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, address: str, *, limit: int, window: float, now: float) -> bool:
        """Whether ``address`` reached ``limit`` failures in the last ``window`` seconds."""
        with self._lock:
            failures = self._prune(address, window, now)
            return len(failures) >= limit

    def fail(self, address: str, *, window: float, now: float) -> int:
        """Count one failure; returns the failures in the window, this one included."""
        with self._lock:
            failures = self._prune(address, window, now)
            failures.append(now)
            return len(failures)

    def _prune(self, address: str, window: float, now: float) -> deque[float]:
        failures = self._failures.setdefault(address, deque())
        while failures and failures[0] <= now - window:
            failures.popleft()
        if len(self._failures) > 10_000:  # forget quiet addresses; memory stays bounded
            for quiet in [a for a, f in self._failures.items() if not f and a != address]:
                del self._failures[quiet]
        return failures


def current_user() -> StaffMember | None:
    """The logged-in account of this request, or None."""
    return g.get("user")


def is_manager() -> bool:
    """Whether the logged-in account is a manager."""
    user = current_user()
    return user is not None and user.role == MANAGER


def manager_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """A view only a manager may use: 403 for anyone else (who is logged in)."""

    @wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if not is_manager():
            log.warning("console_forbidden", endpoint=request.endpoint)
            abort(403, "This needs a manager's login.")
        return view(*args, **kwargs)

    return guarded


def register(app: Flask) -> None:
    """Add the login check, the login and logout views and the template helpers."""
    from syncd.console import current_settings, ledger, now

    @app.before_request
    def _require_login() -> Any:
        g.user = None
        name = session.get("user")
        if name is not None:
            member = ledger().staff_member(name)
            idle = current_settings().console.idle_minutes * 60
            moment = now().timestamp()
            if member is None or not member.active or session.get("password") != _marker(member):
                session.clear()
            elif moment - float(session.get("seen", 0)) > idle:
                session.clear()
                flash(f"You were logged out after {idle // 60} minutes without activity.")
            else:
                session["seen"] = moment
                session.permanent = True
                g.user = member
        if g.user is None and request.endpoint not in PUBLIC_ENDPOINTS:
            if request.method in ("GET", "HEAD"):
                return redirect(url_for("login", next=_local_path(request.full_path)))
            abort(403, "Log in first.")
        return None

    @app.context_processor
    def _helpers() -> dict[str, Any]:
        return {"user": current_user(), "is_manager": is_manager()}

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        from syncd.console._forms import LoginForm

        settings = current_settings().console
        form = LoginForm()
        no_accounts = not ledger().all_staff()
        status = 200
        if form.validate_on_submit():
            address = request.remote_addr or "unknown"
            window = settings.lockout_minutes * 60.0
            moment = now()
            throttle: AddressThrottle = app.extensions["syncd"]["throttle"]
            if throttle.blocked(address, limit=settings.address_failures, window=window,
                                now=moment.timestamp()):
                log.warning("console_address_throttled")
                abort(429, "Too many failed logins from this device. Wait a while, "
                      "or ask a manager.")
            result = staff.login(ledger(), form.name.data or "", form.password.data or "",
                                 now=moment, lock_after=settings.lockout_after,
                                 lock_minutes=settings.lockout_minutes)
            if result.member is not None:
                session.clear()
                session.update(user=result.member.name, seen=moment.timestamp(),
                               password=_marker(result.member))
                session.permanent = True
                log.info("console_login", role=result.member.role)
                return redirect(_local_path(request.args.get("next", "")) or url_for("overview"))
            failures = throttle.fail(address, window=window, now=moment.timestamp())
            if failures == settings.address_failures:
                ledger().add_audit(None, None, "console_address_throttled", "staff", "done",
                                   detail=f"{failures} failed logins from one address in "
                                   f"{settings.lockout_minutes} min")
            log.info("console_login_refused", why=result.refusal)
            status = 401
            if result.refusal == "locked":
                form.form_errors.append(
                    "This account is locked after too many wrong passwords. Try again in "
                    f"{settings.lockout_minutes} minutes, or ask a manager to unlock it.")
            elif result.refusal == "disabled":
                form.form_errors.append("This account is disabled: ask a manager to enable "
                                        "it.")
            else:
                form.form_errors.append(
                    f"Wrong login name or password. After {settings.lockout_after} wrong "
                    "passwords in a row an account is locked for "
                    f"{settings.lockout_minutes} minutes; a manager can unlock it sooner.")
        elif request.method == "POST":
            status = 400
        # A Secure cookie never comes back over plain HTTP: say so rather than loop.
        plain_http = app.config["SESSION_COOKIE_SECURE"] and not request.is_secure and (
            request.headers.get("X-Forwarded-Proto", "").lower() != "https")
        return render_template("login.html", form=form, no_accounts=no_accounts,
                               plain_http=plain_http), status

    @app.route("/logout", methods=["POST"])
    def logout() -> Any:
        user = current_user()
        if user is not None:
            ledger().add_audit(None, None, "staff_logout", "staff", "done",
                               detail=f"account {user.name}", actor=user.name)
        session.clear()
        flash("You are logged out.")
        return redirect(url_for("login"))


def _marker(member: StaffMember) -> str:
    """Changes when the password does: a reset ends the account's other sessions."""
    return member.password_changed_at.isoformat()


def _local_path(target: str) -> str:
    """``target`` when it is a path of this site, else "" (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return ""
    if any(ord(c) < 32 or ord(c) == 127 for c in target):  # no header may carry CR or LF
        return ""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return ""
    return target.rstrip("?")
