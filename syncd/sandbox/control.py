"""The sandbox's own control API under ``/_sandbox/`` (not part of any vendor surface).

- ``GET /_sandbox/`` lists these routes.
- ``GET /_sandbox/requests`` counts requests by vendor, route and status
  (status 0 = connection dropped); ``DELETE`` resets the counts.
- ``GET /_sandbox/timings`` gives route handlers' server time (p50/p95/max ms).
- ``GET /_sandbox/state`` summarises what each emulator holds (counts only).
- ``GET /_sandbox/faults`` and ``PUT /_sandbox/faults/{vendor}`` read and set
  injected faults: ``latency_ms``, ``rate_429``, ``rate_5xx``, ``rate_drop``,
  ``rate_timeout`` (shares 0..1) and ``empty_429`` (bodiless 429s).
- ``POST /_sandbox/actions/{action}`` makes people do things, see
  :data:`ACTIONS`; the body is a JSON object of the action's arguments.
- ``GET /_sandbox/smtp/messages`` returns the mail the SMTP sink received;
  ``DELETE`` empties it. ``GET /_sandbox/webhooks`` lists webhook deliveries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

from syncd.sandbox.google import GoogleEmulator
from syncd.sandbox.http import (
    VENDORS,
    Faults,
    Request,
    Response,
    Router,
    Traffic,
    empty_response,
    json_response,
)
from syncd.sandbox.mailchimp import MailchimpEmulator
from syncd.sandbox.phorest import PhorestEmulator
from syncd.sandbox.smtp import SmtpSink

PREFIX = "/_sandbox"


class ActionError(ValueError):
    """A people action was asked for with missing or wrong arguments (answered 400)."""


class ControlApi:
    """Routes under ``/_sandbox/`` that observe and steer the emulators."""

    vendor = "sandbox"

    def __init__(
        self,
        traffic: Traffic,
        phorest: PhorestEmulator,
        mailchimp: MailchimpEmulator,
        google: GoogleEmulator,
        smtp: SmtpSink | None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.traffic = traffic
        self.phorest = phorest
        self.mailchimp = mailchimp
        self.google = google
        self.smtp = smtp
        self._clock = clock or (lambda: datetime.now(UTC))

    def register(self, router: Router) -> None:
        """Add the control routes."""
        for method, path, handler in (
            ("GET", "/", self._index),
            ("GET", "/requests", self._requests),
            ("DELETE", "/requests", self._reset_requests),
            ("GET", "/timings", self._timings),
            ("GET", "/state", self._state),
            ("GET", "/faults", self._faults),
            ("PUT", "/faults/{vendor}", self._set_faults),
            ("POST", "/actions/{action}", self._action),
            ("GET", "/smtp/messages", self._smtp_messages),
            ("DELETE", "/smtp/messages", self._smtp_clear),
            ("GET", "/webhooks", self._webhooks),
        ):
            router.add(self.vendor, method, PREFIX + path.rstrip("/"), handler)

    def fault_body(self, status: int) -> Response:
        """Plain JSON errors."""
        return json_response(status, {"error": status})

    def gate(self, request: Request) -> Response | None:
        """The control API is never throttled."""
        return None

    # -- observation ---------------------------------------------------------

    def _index(self, _: Request) -> Response:
        return json_response(
            200,
            {
                "routes": [
                    "GET /_sandbox/requests", "DELETE /_sandbox/requests", "GET /_sandbox/timings",
                    "GET /_sandbox/state",
                    "GET /_sandbox/faults", "PUT /_sandbox/faults/{vendor}",
                    "POST /_sandbox/actions/{action}", "GET /_sandbox/smtp/messages",
                    "DELETE /_sandbox/smtp/messages", "GET /_sandbox/webhooks",
                ],
                "actions": {name: doc for name, (doc, _) in ACTIONS.items()},
            },
        )

    def _requests(self, _: Request) -> Response:
        return json_response(200, self.traffic.summary())

    def _timings(self, _: Request) -> Response:
        return json_response(200, self.traffic.timing_summary())

    def _reset_requests(self, _: Request) -> Response:
        self.traffic.reset_counts()
        return empty_response()

    def _state(self, _: Request) -> Response:
        return json_response(
            200,
            {
                "phorest": self.phorest.dump(),
                "mailchimp": self.mailchimp.dump(),
                "google": self.google.dump(),
                "smtp": {"messages": len(self.smtp.messages()) if self.smtp else 0},
            },
        )

    def _faults(self, _: Request) -> Response:
        return json_response(200, {v: f.as_dict() for v, f in self.traffic.faults.items()})

    def _set_faults(self, request: Request) -> Response:
        vendor = request.params["vendor"]
        if vendor not in VENDORS or vendor == "sandbox":
            return json_response(404, {"error": f"unknown vendor {vendor!r}"})
        try:
            body = request.json()
            faults = _faults_from(body or {})
        except ValueError as exc:
            return json_response(400, {"error": str(exc)})
        self.traffic.faults[vendor] = faults
        return json_response(200, faults.as_dict())

    def _smtp_messages(self, _: Request) -> Response:
        return json_response(200, {"messages": self.smtp.messages() if self.smtp else []})

    def _smtp_clear(self, _: Request) -> Response:
        if self.smtp:
            self.smtp.clear()
        return empty_response()

    def _webhooks(self, _: Request) -> Response:
        return json_response(200, {"deliveries": self.mailchimp.webhook_log()})

    # -- people actions -------------------------------------------------------

    def _action(self, request: Request) -> Response:
        name = request.params["action"]
        if name not in ACTIONS:
            return json_response(404, {"error": f"unknown action {name!r}", "known": sorted(ACTIONS)})
        try:
            args = request.json() or {}
            if not isinstance(args, dict):
                raise ActionError("body must be a JSON object")
            result = ACTIONS[name][1](self, args)
        except (ActionError, ValueError, TypeError) as exc:
            return json_response(400, {"error": str(exc)})
        except KeyError as exc:
            return json_response(404, {"error": f"not found: {exc.args[0]}"})
        return json_response(200, {"action": name, "result": result})

    def today(self) -> date:
        """The sandbox's idea of today."""
        return self._clock().date()


def _faults_from(body: dict[str, Any]) -> Faults:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    known = {f.name for f in fields(Faults)}
    unknown = set(body) - known
    if unknown:
        raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
    faults = Faults(**body)
    for name in ("rate_429", "rate_5xx", "rate_drop", "rate_timeout"):
        value = getattr(faults, name)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number between 0 and 1")
    total = faults.rate_429 + faults.rate_5xx + faults.rate_drop + faults.rate_timeout
    if total > 1:
        raise ValueError("fault rates add up to more than 1")
    if not isinstance(faults.latency_ms, (int, float)) or faults.latency_ms < 0:
        raise ValueError("latency_ms must be a number >= 0")
    if not isinstance(faults.empty_429, bool):
        raise ValueError("empty_429 must be true or false")
    return faults


def _need(args: dict[str, Any], name: str, kind: type = str) -> Any:
    value = args.get(name)
    if not isinstance(value, kind) or (kind is str and not value):
        raise ActionError(f"missing or invalid {name!r}")
    return value


def _visit_date(api: ControlApi, args: dict[str, Any]) -> date:
    value = args.get("date")
    return date.fromisoformat(value) if value else api.today()


def _retention_run(api: ControlApi, months: int) -> dict[str, int]:
    """Forget every live client whose last visit (or creation) is older than ``months``."""
    if months < 1:
        raise ActionError("months must be >= 1")
    today = api.today()
    cutoff = _months_before(today, months)
    forgotten = 0
    for client in api.phorest.snapshot_clients():
        if client.get("deleted") or client.get("mergedToClientId") or _is_forgotten(client):
            continue
        seen = client.get("lastVisit") or (client.get("createdAt") or "")[:10]
        if seen and date.fromisoformat(seen[:10]) < cutoff:
            api.phorest.forget(client["clientId"])
            forgotten += 1
    return {"forgotten": forgotten}


def _months_before(day: date, months: int) -> date:
    year, month = divmod(day.year * 12 + day.month - 1 - months, 12)
    return date(year, month + 1, min(day.day, 28))


def _is_forgotten(client: dict[str, Any]) -> bool:
    return not client.get("email") and not client.get("mobile") and client.get("firstName") in (
        None,
        "",
        "Anonymous",
    )


ActionFn = Callable[[ControlApi, dict[str, Any]], Any]

# name -> (what a person did, how it changes the world)
ACTIONS: dict[str, tuple[str, ActionFn]] = {
    "mailchimp-unsubscribe": (
        "a subscriber clicks the unsubscribe link {email}",
        lambda api, a: api.mailchimp.click_unsubscribe(_need(a, "email")),
    ),
    "mailchimp-spam-complaint": (
        "a subscriber marks a campaign as spam {email}",
        lambda api, a: api.mailchimp.spam_complaint(_need(a, "email")),
    ),
    "mailchimp-bounce": (
        "an address hard-bounces {email}",
        lambda api, a: api.mailchimp.hard_bounce(_need(a, "email")),
    ),
    "mailchimp-change-email": (
        "a subscriber changes their address in a Mailchimp form {old, new}",
        lambda api, a: api.mailchimp.change_email(_need(a, "old"), _need(a, "new")),
    ),
    "mailchimp-signup": (
        "a person signs up through a Mailchimp-hosted form {email, fname?, lname?}",
        lambda api, a: api.mailchimp.signup(_need(a, "email"), a.get("fname", ""), a.get("lname", "")),
    ),
    "mailchimp-register-webhook": (
        "the business adds an audience webhook {url, sources?}",
        lambda api, a: api.mailchimp.add_webhook(_need(a, "url"), sources=a.get("sources")),
    ),
    "phorest-consent": (
        "staff record email-marketing consent on or off {client_id, consent: bool}",
        lambda api, a: api.phorest.edit_client(
            _need(a, "client_id"), emailMarketingConsent=_need(a, "consent", bool)
        ),
    ),
    "phorest-edit-email": (
        "staff change a client's email {client_id, email}",
        lambda api, a: api.phorest.edit_client(_need(a, "client_id"), email=_need(a, "email")),
    ),
    "phorest-edit-name": (
        "staff correct a client's name {client_id, first_name?, last_name?}",
        lambda api, a: api.phorest.edit_client(
            _need(a, "client_id"),
            **{
                k: v
                for k, v in (("firstName", a.get("first_name")), ("lastName", a.get("last_name")))
                if v
            },
        ),
    ),
    "phorest-visit": (
        "a client visits and pays {client_id, date?}",
        lambda api, a: api.phorest.record_visit(_need(a, "client_id"), _visit_date(api, a)),
    ),
    "phorest-book": (
        "a client books an appointment {client_id, branch_id, date? (default: a week ahead)}",
        lambda api, a: api.phorest.add_appointment(
            _need(a, "branch_id"), clientId=_need(a, "client_id"),
            appointmentDate=a.get("date") or (api.today() + timedelta(days=7)).isoformat(),
            startTime="10:00:00", state="BOOKED", activationState="ACTIVE",
        ),
    ),
    "phorest-forget": (
        "staff press Client actions > Forget {client_id}",
        lambda api, a: api.phorest.forget(_need(a, "client_id")),
    ),
    "phorest-delete": (
        "a client record is deleted {client_id}",
        lambda api, a: api.phorest.delete(_need(a, "client_id")),
    ),
    "phorest-merge": (
        "staff merge a duplicate into another client {client_id, into}",
        lambda api, a: api.phorest.merge(_need(a, "client_id"), _need(a, "into")),
    ),
    "phorest-retention-run": (
        "Phorest's Data Retention setting forgets clients not seen for {months} months",
        lambda api, a: _retention_run(api, _need(a, "months", int)),
    ),
}
