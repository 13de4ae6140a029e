"""The console's pages: overview, requests, manual steps, retention, audit and users.

Each view reads or changes the ledger through the functions the command line
uses; what it shows holds request ids, Phorest client ids, staff names, states
and times, never a client's address, number or name. The one exception is the
identifier a user typed into the form they are filling, shown back to them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import structlog
from flask import Flask, abort, flash, redirect, render_template, request, send_file, url_for
from werkzeug.routing import IntegerConverter

from syncd import desk, engine, export, retention, rights, staff, status
from syncd.console._auth import current_user, manager_only
from syncd.console._forms import (
    ActionForm,
    AddUserForm,
    AuditSearchForm,
    CancelForm,
    ConfirmForm,
    ExtendForm,
    FileRequestForm,
    PasswordForm,
    PurgeConfirmForm,
    RoleForm,
)
from syncd.errors import ConfigError, ConnectorError, SyncdError

log = structlog.get_logger(__name__)

# (endpoint, label, manager only)
NAV = (("overview", "Overview", False), ("requests", "Requests", False),
       ("new_request", "File a request", False), ("steps", "Manual steps", False),
       ("retention_page", "Retention", False), ("audit", "Audit", False),
       ("users", "Users", True))
PER_PAGE = 50
OVERVIEW_LISTED = 20  # requests due soon shown by id on the overview; the rest are counted
AUDIT_LIMIT = 500
EXPORT_DIR_MODE = 0o700
SQLITE_MAX_INT = 2**63 - 1
_FLAGS = re.compile(r"--(email|phone|client-id|months|reason|processor|by)\b")


def plain(message: str) -> str:
    """A command-line message for the console: ``--client-id`` reads "client id"."""
    return _FLAGS.sub(lambda m: m.group(1).replace("-", " "), message).replace(
        "syncd requests --all", "the requests page").replace("syncd request show", "the request")


def register(app: Flask) -> None:
    """Add every page to ``app``."""
    from syncd.console import current_settings, ledger, now

    def wake() -> None:
        app.extensions["syncd"]["wake"]()

    app.url_map.converters["int"] = _LedgerInt

    # -- overview --------------------------------------------------------------------------

    @app.route("/")
    def overview() -> Any:
        settings = current_settings()
        report = status.gather(settings, now=now())
        due_soon = [r for r in report.requests if r["overdue"] or r["due_soon"]]
        return render_template("overview.html", report=report, due_soon=due_soon,
                               listed=OVERVIEW_LISTED,
                               warn=settings.policy.request_warning_days)

    # -- requests --------------------------------------------------------------------------

    @app.route("/requests")
    def requests() -> Any:
        settings = current_settings()
        show_all = request.args.get("all") == "1"
        page = _page_number()
        moment = now()
        if show_all:
            total = ledger().count_requests()
            chosen = ledger().all_requests(PER_PAGE, (page - 1) * PER_PAGE)
        else:
            total = ledger().count_open_requests()
            chosen = ledger().open_requests(PER_PAGE, (page - 1) * PER_PAGE)
        rows = [desk.describe(ledger(), r.id, moment,
                              warning_days=settings.policy.request_warning_days)
                for r in chosen]
        pages = max(1, -(-total // PER_PAGE))
        return render_template("requests.html", rows=rows, show_all=show_all, page=page,
                               pages=pages, total=total)

    @app.route("/requests/new", methods=["GET", "POST"])
    def new_request() -> Any:
        form = FileRequestForm()
        status_code = 200
        if form.validate_on_submit():
            try:
                request_id = _file(form)
            except (SyncdError, ConfigError) as error:
                form.form_errors.append(_filing_error(error))
                status_code = 422
            else:
                wake()
                flash(f"Request #{request_id} filed.")
                return redirect(url_for("request_page", request_id=request_id))
        elif request.method == "POST":
            status_code = 422
        return render_template("new_request.html", form=form), status_code

    def _file(form: FileRequestForm) -> int:
        settings = current_settings()
        user = current_user()
        assert user is not None
        built, keys = engine.build(settings, needed_by="the console")
        identifiers = {"email": _text(form.email.data), "phone": _text(form.phone.data),
                       "client_id": _text(form.client_id.data)}
        person = rights.resolve(built["phorest"], keys, **identifiers)
        if form.kind.data == "export":
            directory = export_directory(settings)
            rows = export.gather(ledger(), settings, keys, person, built)
            request_id, _path = export.file_export(
                ledger(), settings, person, rows, form.export_format.data or "csv",
                output=None, filed_by=user.name, now=now(), directory=directory)
            return request_id
        return desk.file_request(ledger(), settings, built, keys, form.kind.data or "",
                                 person, filed_by=user.name, note=_text(form.note.data),
                                 now=now())

    @app.route("/requests/<int:request_id>")
    def request_page(request_id: int) -> Any:
        settings = current_settings()
        shown = _describe(request_id, settings)
        manual = {p.name for p in settings.manual_processors}
        closable = {s["processor"] for s in shown["steps"]
                    if s["state"] == "failed" or (s["kind"] == "manual" and s["state"] == "waiting")}
        return render_template(
            "request.html", r=shown, closable=sorted(closable), manual=manual,
            export_file=_export_file(request_id) if shown["kind"] == "export" else None,
            keep_minutes=settings.console.export_keep_minutes,
            confirm_form=ConfirmForm(), extend_form=ExtendForm(), cancel_form=CancelForm())

    @app.route("/requests/<int:request_id>/confirm", methods=["POST"])
    @manager_only
    def confirm_step(request_id: int) -> Any:
        form = ConfirmForm()
        back = url_for("steps") if form.back.data == "steps" else url_for(
            "request_page", request_id=request_id)
        if not form.validate_on_submit():
            abort(400, "Choose the step to confirm.")
        user = current_user()
        assert user is not None
        try:
            rights.confirm(ledger(), current_settings(), request_id, form.processor.data or "",
                           by=user.name, now=now())
        except SyncdError as error:
            flash(plain(str(error)), "error")
            return redirect(back)
        wake()
        done = ledger().request(request_id)
        flash(f"Request #{request_id}: the {form.processor.data} step is confirmed."
              + (" Every processor is done: the request is complete."
                 if done is not None and done.state == "done" else ""))
        return redirect(back)

    @app.route("/requests/<int:request_id>/extend", methods=["POST"])
    @manager_only
    def extend_request(request_id: int) -> Any:
        form = ExtendForm()
        if not form.validate_on_submit():
            flash("Give the reason for the extension.", "error")
        else:
            user = current_user()
            assert user is not None
            try:
                extended = rights.extend(ledger(), current_settings(), request_id,
                                         int(form.months.data or 0), form.reason.data or "",
                                         by=user.name)
            except SyncdError as error:
                flash(plain(str(error)), "error")
            else:
                flash(f"Request #{request_id} extended: due {extended.due_at:%Y-%m-%d}.")
        return redirect(url_for("request_page", request_id=request_id))

    @app.route("/requests/<int:request_id>/cancel", methods=["POST"])
    @manager_only
    def cancel_request(request_id: int) -> Any:
        form = CancelForm()
        if not form.validate_on_submit():
            flash("Give the reason for cancelling.", "error")
        else:
            user = current_user()
            assert user is not None
            try:
                rights.cancel(ledger(), request_id, form.reason.data or "", by=user.name)
            except SyncdError as error:
                flash(plain(str(error)), "error")
            else:
                flash(f"Request #{request_id} cancelled.")
        return redirect(url_for("request_page", request_id=request_id))

    @app.route("/requests/<int:request_id>/export")
    @manager_only
    def download_export(request_id: int) -> Any:
        found = ledger().request(request_id)
        path = _export_file(request_id) if found is not None and found.kind == "export" else None
        if path is None:
            abort(404, "This export's file is gone: it is deleted "
                  f"{current_settings().console.export_keep_minutes} minutes after it was "
                  "written. File the export again.")
        user = current_user()
        assert user is not None
        ledger().add_audit(found.subject_key, None, "export_download", "R8:access", "done",
                           request_id=request_id, actor=user.name,
                           detail=f"downloaded {path.suffix[1:]} file")
        response = send_file(path, as_attachment=True, download_name=path.name,
                             conditional=False, etag=False, max_age=0)
        # send_file's "no-cache, max-age=0" lets a browser or proxy keep a copy of the
        # person's data; like every other page, the file must not be stored.
        response.headers["Cache-Control"] = "no-store"
        return response

    # -- manual steps ----------------------------------------------------------------------

    @app.route("/steps")
    def steps() -> Any:
        settings = current_settings()
        moment = now()
        rows = []
        shown = [s for s in ledger().open_steps() if s.kind == "manual" or s.state == "failed"]
        requests_of = ledger().requests_by_id(s.request_id for s in shown)
        for step in shown:
            found = requests_of.get(step.request_id)
            rows.append({"step": step, "request": found,
                         "days_left": rights.days_left(found, moment) if found else None,
                         "paper": settings.manual_processor(step.processor) is not None})
        rows.sort(key=lambda r: (r["days_left"] if r["days_left"] is not None else 0,
                                 r["step"].id))
        page = _page_number()
        pages = max(1, -(-len(rows) // PER_PAGE))
        return render_template("steps.html", rows=rows[(page - 1) * PER_PAGE:page * PER_PAGE],
                               total=len(rows), page=page, pages=pages,
                               confirm_form=ConfirmForm())

    # -- retention -------------------------------------------------------------------------

    @app.route("/retention")
    def retention_page() -> Any:
        settings = current_settings()
        guarded = ledger().guarded_retention_runs()
        evaluation = None
        problem = None
        try:
            built, _keys = engine.build(settings, needed_by="the console")
            evaluation = retention.evaluate(built["phorest"], settings, today=now().date(),
                                            ledger=ledger())
        except (SyncdError, ConfigError) as error:
            problem = _filing_error(error)
        return render_template("retention.html", evaluation=evaluation, guarded=guarded,
                               problem=problem, form=PurgeConfirmForm(),
                               months=settings.policy.retention_months)

    @app.route("/retention/confirm", methods=["POST"])
    @manager_only
    def confirm_purge() -> Any:
        form = PurgeConfirmForm()
        if not form.validate_on_submit():
            abort(400, "Choose the held-back run to confirm.")
        settings = current_settings()
        user = current_user()
        assert user is not None
        try:
            built, keys = engine.build(settings, needed_by="the console")
            result = retention.purge(ledger(), settings, built, keys, now=now(),
                                     confirm=(form.run_id.data, form.count.data),
                                     confirmed_by=user.name)
        except (SyncdError, ConfigError) as error:
            flash(plain(_filing_error(error)), "error")
        else:
            wake()
            flash(f"Retention run #{result.run_id} confirmed: {len(result.request_ids)} "
                  "erasure request(s) filed.")
        return redirect(url_for("retention_page"))

    # -- audit -----------------------------------------------------------------------------

    @app.route("/audit", methods=["GET", "POST"])
    def audit() -> Any:
        form = AuditSearchForm()
        entries: list[dict[str, Any]] = []
        searched = False
        status_code = 200
        if form.validate_on_submit():
            searched = True
            lookup, value = form.lookup.data or "", (form.value.data or "").strip()
            try:
                if lookup == "request":
                    if not value.lstrip("#").isdigit():
                        raise SyncdError("a request id is a number")
                    events = ledger().find_audit(request_id=int(value.lstrip("#")),
                                                 limit=AUDIT_LIMIT, newest_first=True)
                else:
                    keys = desk.audit_keys(ledger(), current_settings(), lookup, value)
                    events = ledger().find_audit(subject_keys=keys, limit=AUDIT_LIMIT,
                                                 newest_first=True)
                entries = [desk.audit_entry(e) for e in events]
            except (SyncdError, ConfigError) as error:
                form.form_errors.append(plain(str(error)))
                status_code = 422
        elif request.method == "POST":
            status_code = 422
        else:
            entries = [desk.audit_entry(e) for e in ledger().find_audit(limit=50,
                                                                       newest_first=True)]
        return render_template("audit.html", form=form, entries=entries,
                               searched=searched), status_code

    # -- users -----------------------------------------------------------------------------

    @app.route("/users", methods=["GET", "POST"])
    @manager_only
    def users() -> Any:
        form = AddUserForm()
        status_code = 200
        if form.validate_on_submit():
            try:
                added = staff.add(ledger(), (form.name.data or "").strip(), form.role.data or "",
                                  form.password.data or "", by=_me())
            except SyncdError as error:
                form.form_errors.append(str(error))
                status_code = 422
            else:
                flash(f"Account {added.name} added ({added.role}).")
                return redirect(url_for("users"))
        elif request.method == "POST":
            status_code = 422
        return render_template("users.html", form=form, members=ledger().all_staff(),
                               action_form=ActionForm(), password_form=PasswordForm(),
                               role_form=RoleForm()), status_code

    @app.route("/users/<name>/<action>", methods=["POST"])
    @manager_only
    def user_action(name: str, action: str) -> Any:
        forms = {"disable": ActionForm, "enable": ActionForm, "reset": PasswordForm,
                 "role": RoleForm}
        if action not in forms:
            abort(404)
        form = forms[action]()
        if not form.validate_on_submit():
            flash(_form_problem(form), "error")
            return redirect(url_for("users"))
        try:
            if action in ("disable", "enable"):
                staff.set_active(ledger(), name, action == "enable", by=_me())
                flash(f"Account {name} {action}d.")
            elif action == "reset":
                staff.reset_password(ledger(), name, form.password.data, by=_me())
                flash(f"Account {name}: password reset.")
            else:
                staff.set_role(ledger(), name, form.role.data, by=_me())
                flash(f"Account {name} is now {form.role.data}.")
        except SyncdError as error:
            flash(str(error), "error")
        return redirect(url_for("users"))

    def _describe(request_id: int, settings: Any) -> dict[str, Any]:
        try:
            return desk.describe(ledger(), request_id, now(), audit=True,
                                 warning_days=settings.policy.request_warning_days)
        except SyncdError:
            abort(404, f"There is no request #{request_id}.")

    def _export_file(request_id: int) -> Path | None:
        directory = export_directory(current_settings(), create=False)
        for fmt in ("csv", "json"):
            path = directory / export.file_name(request_id, fmt)
            if path.is_file() and not path.is_symlink():
                return path
        return None

    def _me() -> str:
        user = current_user()
        assert user is not None
        return user.name


class _LedgerInt(IntegerConverter):
    """``<int:…>`` up to SQLite's largest integer: a larger id is not found (404), where
    the ledger would raise OverflowError (500)."""

    def __init__(self, url_map: Any, fixed_digits: int = 0, min: int | None = None,  # noqa: A002
                 max: int | None = SQLITE_MAX_INT, signed: bool = False) -> None:  # noqa: A002
        super().__init__(url_map, fixed_digits, min, max, signed)


def export_directory(settings: Any, *, create: bool = True) -> Path:
    """Where console exports go (``[console] export_dir``), created 0700 when asked."""
    directory = settings.console.exports_path(Path(settings.ledger.path))
    if create:
        directory.mkdir(mode=EXPORT_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, EXPORT_DIR_MODE)
    return directory


def _filing_error(error: Exception) -> str:
    if isinstance(error, ConnectorError):
        log.warning("console_vendor_unreachable", error=type(error).__name__)
        return ("A processor could not be reached just now, so nothing was filed. Try again "
                "in a few minutes; syncd status shows which one.")
    if isinstance(error, ConfigError):
        return "The configuration is incomplete for this: " + "; ".join(error.errors)[:300]
    return plain(str(error))


def _form_problem(form: Any) -> str:
    for field in form:
        if field.errors:
            return f"{field.label.text}: {field.errors[0]}"
    return "The form could not be used; reload the page and try again."


def _page_number() -> int:
    text = request.args.get("page", "1")
    return int(text) if text.isdigit() and 0 < int(text) < 100_000 else 1


def _text(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None
