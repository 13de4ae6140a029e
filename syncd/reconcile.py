"""Reconciliation: what should happen for one subject, decided from what each side holds.

Pure: no ledger, no network, no files, no clock, no logging. The caller reads
Phorest (the controller's system of record), Mailchimp and the ledger, builds
one :class:`SubjectView` per person and turns the :class:`Planned` actions into
ledger tasks. This is where rules R1, R2, R3/R5 (Mailchimp side) and R6 live.

Precedence (DESIGN §1 "Conflicts"), checked in this order by :func:`plan`:

1. Erasure beats everything. A suppressed subject (R3/R4), or a client Phorest
   reports deleted, forgotten or merged away (R5), only ever gets ``erase``.
2. Restriction (R7) and orphans (a member with no Phorest client, R1) only ever
   lose their subscription.
3. An opt-out beats an opt-in (R2). A Mailchimp opt-out (``unsubscribed`` or
   ``cleaned``, or one the ledger recorded) stands unless Phorest's consent was
   switched on *strictly after* it; a standing opt-out withdraws Phorest's
   consent. A newer opt-in is honoured with one ``subscribe``; when Mailchimp
   refuses it (compliance state) the caller records ``resubscribe_refused`` and
   a person must act.
4. Without consent (R1), a ``subscribed`` or ``pending`` member is unsubscribed.
5. With consent: an email change moves the member (R6), an absent member is
   subscribed with FNAME/LNAME only (R1, never ``pending``), names are
   rectified (R6) and extra merge fields cleared (R1).

Times: only processor timestamps are compared (Phorest's ``updatedAt`` for the
opt-in, Mailchimp's ``last_changed`` or the ledger's recorded opt-out for the
opt-out), never syncd's clock. All datetimes must be timezone-aware. When the
opt-out's time is unknown, or ties the opt-in, the opt-out wins; when several
opt-out times are known, the newest counts.

syncd never edits a member that is already opted out (no move, rename or
field clearing): Mailchimp moves ``last_changed`` on any edit, and that
timestamp is the opt-out's only trace when the ledger has none.

Two statuses need a decision the rules leave open:

* An *archived* Phorest client keeps what they have but is never recruited:
  no ``subscribe``, but no ``unsubscribe`` for being archived either. An
  unsubscribe cannot be undone through the API, and on un-archiving it would
  read as the person's own opt-out and withdraw their consent. Opt-outs,
  moves and rectification still apply.
* A *pending* member (a Mailchimp sign-up awaiting confirmation) counts as
  marketed: unsubscribed without consent, set ``subscribed`` directly (no
  confirmation email) with consent, left alone for an archived client.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final, Literal

from connectors.base import Action, ActionKind, ClientRecord, MemberRecord

Processor = Literal["mailchimp", "phorest"]
Rule = Literal["R1", "R2", "R3", "R5", "R6"]

# Phorest states after which the person must vanish from every processor (R5).
ERASED_CLIENT_STATES: Final = frozenset({"deleted", "forgotten", "merged"})
# Mailchimp's compliance state: an opt-out that Mailchimp itself enforces.
OPTED_OUT_STATUSES: Final = frozenset({"unsubscribed", "cleaned"})
# Receiving marketing, or one confirmation click away from it.
MARKETED_STATUSES: Final = frozenset({"subscribed", "pending"})
# Members whose address syncd may change: never an opted-out or archived one.
MOVABLE_STATUSES: Final = frozenset({"subscribed", "pending", "transactional"})


@dataclass(frozen=True, slots=True)
class LedgerFacts:
    """What the ledger knows about a subject beyond what the two systems show now.

    Attributes:
        suppressed: erased (R3/R4/R5); never re-added, erased wherever it appears.
        restricted: R7; removed from marketing and excluded from syncs.
        opted_out_at: the newest opt-out syncd has observed, stamped by the
            processor that recorded it.
        opted_in_at: Phorest's ``updatedAt`` when consent was last seen changing
            from false to true.
        synced_email: the address the member was last synced under.
        resubscribe_refused: Mailchimp refused a ``subscribe`` (compliance
            state). It blocks every further ``subscribe`` for the subject, so
            the caller clears it when ``opted_in_at`` or the email changes.
    """

    suppressed: bool = False
    restricted: bool = False
    opted_out_at: datetime | None = None
    opted_in_at: datetime | None = None
    synced_email: str | None = None
    resubscribe_refused: bool = False


@dataclass(frozen=True, slots=True)
class SubjectView:
    """Everything :func:`plan` needs about one person.

    Attributes:
        subject_key: the subject's HMAC key.
        client: the Phorest record (for a merge, the merged-away record; the
            survivor is a view of its own), or None.
        member: the Mailchimp member at the client's address, or at
            ``facts.synced_email`` when the address changed, or None.
        facts: what the ledger knows.
        address_shared: another live Phorest client (the merge survivor, a
            family member) uses the same address. A deletion, merge or forget
            of *this* record then leaves the member to that client's view;
            suppression still erases it.

    Raises:
        ValueError: a live client's member is at neither the client's address
            nor the synced one (the message holds no address).
    """

    subject_key: str
    client: ClientRecord | None
    member: MemberRecord | None
    facts: LedgerFacts = LedgerFacts()
    address_shared: bool = False

    def __post_init__(self) -> None:
        client, member = self.client, self.member
        if client is None or client.state in ERASED_CLIENT_STATES:
            return
        if member is None or member.status == "absent":
            return
        if not (_same(member.email, client.email) or _same(member.email, self.facts.synced_email)):
            # Acting on it could move or rename someone else's member.
            raise ValueError("member is at neither the client's address nor the synced one")


@dataclass(frozen=True, slots=True)
class Planned:
    """One action :func:`plan` decided on, and why.

    Attributes:
        processor: the system to act on.
        action: the action, as the connector takes it.
        rule: the DESIGN §1 rule it restores (R3 for a suppressed subject).
        why: a short machine-readable reason; never personal data.
    """

    processor: Processor
    action: Action
    rule: Rule
    why: str


def plan(view: SubjectView) -> list[Planned]:
    """Decide the actions that bring one subject back in line with R1, R2, R3/R5 and R6.

    Mailchimp actions come in the order they must run: a ``move_email`` comes
    first, and the actions after it address the new email.

    Args:
        view: what Phorest, Mailchimp and the ledger hold for the subject.

    Returns:
        The actions, possibly none. A suppressed subject only ever gets
        ``erase``; ``pending`` is never requested.
    """
    client, facts = view.client, view.facts
    member = None if _absent(view.member) else view.member
    key = view.subject_key
    client_id = client.client_id if client is not None else None

    erased = _erasure_reason(view)
    if erased is not None:
        if member is None or (view.address_shared and not facts.suppressed):
            return []
        rule: Rule = "R3" if facts.suppressed else "R5"
        return [_mailchimp("erase", key, member.email, client_id, rule, erased)]

    if facts.restricted or client is None:
        if member is None or member.status not in MARKETED_STATUSES:
            return []
        why = "restricted" if facts.restricted else "no_client_in_phorest"
        return [_mailchimp("unsubscribe", key, member.email, client_id, "R1", why)]

    planned: list[Planned] = []
    consent = client.email_consent
    opt_out = _standing_opt_out(member, facts)
    if consent and opt_out is not None:
        action = Action("withdraw_consent", key, client_id=client_id)
        planned.append(Planned("phorest", action, "R2", opt_out))
        consent = False
    if not consent:
        if member is not None and member.status in MARKETED_STATUSES:
            # A standing opt-out is R2 propagating; otherwise consent was never there (R1).
            rule = "R2" if opt_out is not None else "R1"
            why = opt_out or "no_consent_in_phorest"
            planned.append(_mailchimp("unsubscribe", key, member.email, client_id, rule, why))
        return planned
    email = (client.email or "").strip()
    if not email:
        # No address in Phorest: nothing to add or rectify (a member at the old
        # address keeps the consent the person still has).
        return planned

    if member is not None and member.status in MOVABLE_STATUSES and not _same(member.email, email):
        action = Action("move_email", key, email=member.email, new_email=email, client_id=client_id)
        planned.append(Planned("mailchimp", action, "R6", "email_changed_in_phorest"))
        member = replace(member, email=email)

    first, last = client.first_name.strip(), client.last_name.strip()
    if member is None or member.status != "subscribed":
        if client.state != "active" or facts.resubscribe_refused:
            # Archived clients keep what they have but are never recruited; a
            # refused re-subscription waits for the person.
            return planned
        opted_back_in = facts.opted_out_at is not None or (
            member is not None and member.status in OPTED_OUT_STATUSES
        )
        why = "opted_in_in_phorest_after_opt_out" if opted_back_in else "consent_in_phorest"
        action = Action(
            "subscribe", key, email=email, client_id=client_id, first_name=first, last_name=last
        )
        planned.append(Planned("mailchimp", action, "R1", why))
        # An opted-out member's subscribe may be refused; clearing its fields
        # anyway would move last_changed past the opt-in (see module docstring).
        if (
            member is not None and member.status not in OPTED_OUT_STATUSES
            and _same(member.email, email) and member.extra_fields
        ):
            planned.append(_clear_extra_fields(key, email, client_id, member.extra_fields))
        return planned

    if (member.first_name.strip(), member.last_name.strip()) != (first, last):
        action = Action(
            "update_names", key, email=member.email, client_id=client_id,
            first_name=first, last_name=last,
        )
        planned.append(Planned("mailchimp", action, "R6", "name_changed_in_phorest"))
    if member.extra_fields:
        planned.append(_clear_extra_fields(key, member.email, client_id, member.extra_fields))
    return planned


def plan_all(views: Iterable[SubjectView]) -> Iterator[Planned]:
    """Plan every subject in turn, streaming (memory stays bounded by one view).

    Args:
        views: one view per subject.

    Yields:
        Each subject's actions, subject by subject, in :func:`plan`'s order.
    """
    for view in views:
        yield from plan(view)


def _erasure_reason(view: SubjectView) -> str | None:
    """Why the subject must be erased from Mailchimp, or None."""
    if view.facts.suppressed:
        return "suppressed"
    if view.client is not None and view.client.state in ERASED_CLIENT_STATES:
        return f"client_{view.client.state}"
    return None


def _standing_opt_out(member: MemberRecord | None, facts: LedgerFacts) -> str | None:
    """The reason an opt-out overrides Phorest's consent, or None if there is none.

    The opt-out's time is the newest of the ledger's record and, for a member
    in compliance state, Mailchimp's ``last_changed``. Phorest's opt-in wins
    only if it is known and strictly newer than a known opt-out time.
    """
    opted_out = member is not None and member.status in OPTED_OUT_STATUSES
    if not opted_out and facts.opted_out_at is None:
        return None
    candidates = [facts.opted_out_at, member.last_changed if opted_out and member else None]
    times = [t for t in candidates if t is not None]
    if times and facts.opted_in_at is not None and facts.opted_in_at > max(times):
        return None
    return f"{member.status}_in_mailchimp" if opted_out and member else "opt_out_on_record"


def _mailchimp(
    kind: ActionKind, key: str, email: str, client_id: str | None, rule: Rule, why: str
) -> Planned:
    """A Mailchimp action that needs only the member's address."""
    return Planned("mailchimp", Action(kind, key, email=email, client_id=client_id), rule, why)


def _clear_extra_fields(
    key: str, email: str, client_id: str | None, fields: tuple[str, ...]
) -> Planned:
    """Blank merge fields beyond FNAME/LNAME (R1: name and email only)."""
    action = Action("clear_extra_fields", key, email=email, client_id=client_id, fields=fields)
    return Planned("mailchimp", action, "R1", "extra_merge_fields")


def _absent(member: MemberRecord | None) -> bool:
    """Whether Mailchimp holds nothing for this address."""
    return member is None or member.status == "absent"


def _same(a: str | None, b: str | None) -> bool:
    """Whether two addresses are the same mailbox (trimmed, case-insensitive)."""
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()
