"""The console's forms (Flask-WTF: each carries the CSRF token and checks its fields)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import HiddenField, IntegerField, PasswordField, RadioField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import AnyOf, DataRequired, InputRequired, Length, NumberRange, Optional

from syncd.staff import MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS

KINDS = [SelectChoice("erase", "Erase everywhere"),
         SelectChoice("restrict", "Restrict (stop all processing)"),
         SelectChoice("unrestrict", "Lift a restriction"),
         SelectChoice("export", "Export (a copy of their data)")]
ROLE_CHOICES = [SelectChoice("reception", "Reception"), SelectChoice("manager", "Manager")]
LOOKUPS = [SelectChoice("email", "Email"), SelectChoice("phone", "Phone"),
           SelectChoice("client_id", "Phorest client id"), SelectChoice("request", "Request id")]


class LoginForm(FlaskForm):
    """Log in."""

    name = StringField("Login name", validators=[DataRequired(), Length(max=40)],
                       render_kw={"autocomplete": "username"})
    password = PasswordField("Password", validators=[DataRequired(),
                                                     Length(max=MAX_PASSWORD_CHARS)],
                             render_kw={"autocomplete": "current-password"})


class FileRequestForm(FlaskForm):
    """File a request by email, phone or Phorest client id (at least one)."""

    kind = RadioField("Request", choices=KINDS, default="erase",
                      validators=[InputRequired()])
    email = StringField("Email", validators=[Optional(), Length(max=254)])
    phone = StringField("Mobile number", validators=[Optional(), Length(max=40)])
    client_id = StringField("Phorest client id", validators=[Optional(), Length(max=64)])
    export_format = SelectField("Export format", default="csv",
                                choices=[SelectChoice("csv", "CSV"), SelectChoice("json", "JSON")])
    note = StringField("Note (no personal data)", validators=[Optional(), Length(max=200)])

    def validate(self, extra_validators=None) -> bool:  # type: ignore[no-untyped-def]
        """The fields, and at least one identifier."""
        if not super().validate(extra_validators):
            return False
        given = (self.email.data, self.phone.data, self.client_id.data)
        if not any((value or "").strip() for value in given):
            self.form_errors.append("Give the person's email, mobile number or Phorest "
                                    "client id.")
            return False
        return True


class ConfirmForm(FlaskForm):
    """Confirm a processor's step of a request."""

    processor = StringField(validators=[DataRequired(), Length(max=40)])
    back = HiddenField(validators=[Optional(), AnyOf(["steps", "request"])])


class ExtendForm(FlaskForm):
    """Extend a request's deadline."""

    months = SelectField("By", default="1",
                         choices=[SelectChoice("1", "1 month"), SelectChoice("2", "2 months")])
    reason = StringField("Reason (no personal data)", validators=[DataRequired(),
                                                                  Length(max=200)])


class CancelForm(FlaskForm):
    """Cancel a request."""

    reason = StringField("Reason (no personal data)", validators=[DataRequired(),
                                                                  Length(max=200)])


class PurgeConfirmForm(FlaskForm):
    """Confirm a retention run the purge guard held back."""

    run_id = IntegerField(validators=[InputRequired(), NumberRange(min=1)])
    count = IntegerField(validators=[InputRequired(), NumberRange(min=0)])


class AuditSearchForm(FlaskForm):
    """Search the audit trail by identifier (hashed for the lookup) or request id."""

    lookup = SelectField("Search by", choices=LOOKUPS, default="email")
    value = StringField("Value", validators=[DataRequired(), Length(max=254)])


class AddUserForm(FlaskForm):
    """Add a staff account."""

    name = StringField("Login name", validators=[DataRequired(), Length(max=40)])
    role = SelectField("Role", choices=ROLE_CHOICES, default="reception")
    password = PasswordField("Password", validators=[
        DataRequired(), Length(min=MIN_PASSWORD_CHARS, max=MAX_PASSWORD_CHARS)],
        render_kw={"autocomplete": "new-password"})


class PasswordForm(FlaskForm):
    """Reset a staff account's password."""

    password = PasswordField("New password", validators=[
        DataRequired(), Length(min=MIN_PASSWORD_CHARS, max=MAX_PASSWORD_CHARS)],
        render_kw={"autocomplete": "new-password"})


class RoleForm(FlaskForm):
    """Change a staff account's role."""

    role = SelectField("Role", choices=ROLE_CHOICES)


class ActionForm(FlaskForm):
    """A button with nothing but the CSRF token (disable, enable, log out)."""
