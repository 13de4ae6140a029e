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

Shared addresses (families, couples, duplicates staff archived instead of
merging): :func:`govern` decides which Phorest records speak for one address,
and every path (full resync, poll, webhook inbox) asks it:

* *Active* records govern the address. *Archived* records govern only when no
  active record uses it; *dead* ones (deleted, forgotten, merged away) only
  when no live one does.
* An opt-out anywhere wins: the member is subscribed only if **every**
  governing record consents and no opt-out stands. One record without consent
  unsubscribes the shared member; the other records keep their consent in
  Phorest (that unsubscribe is syncd's own, see ``LedgerFacts.unsubscribed_by_syncd``).
  A Mailchimp opt-out at the address withdraws consent on **every** live record
  there: the mailbox's owner said stop and nobody can tell which of them clicked.
* Names come from one record, the governing record created first (Phorest's
  ``createdAt``, then the lowest client id): both are fixed for a record's
  life, so two records never flip the member's name between runs.
* A dead record at an address a live record still governs does not erase the
  member (:attr:`Governance.kept`); suppression (R3) still does.

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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final, Literal

from connectors.base import Action, ActionKind, ClientRecord, MemberRecord

Processor = Literal["mailchimp", "phorest", "google_analytics"]
Rule = Literal["R1", "R2", "R3", "R5", "R6"]

# Phorest states after which the person must vanish from every processor (R5).
ERASED_CLIENT_STATES: Final = frozenset({"deleted", "forgotten", "merged"})
# Mailchimp's compliance state: an opt-out that Mailchimp itself enforces.
OPTED_OUT_STATUSES: Final = frozenset({"unsubscribed", "cleaned"})
# Receiving marketing, or one confirmation click away from it.
MARKETED_STATUSES: Final = frozenset({"subscribed", "pending"})
# Members whose address syncd may change: never an opted-out or archived one.
MOVABLE_STATUSES: Final = frozenset({"subscribed", "pending", "transactional"})
# Governance tiers: a tier speaks for an address only when no better tier uses it.
TIER_ACTIVE, TIER_ARCHIVED, TIER_DEAD = "active", "archived", "dead"
_TIER_RANK: Final = {TIER_ACTIVE: 0, TIER_ARCHIVED: 1, TIER_DEAD: 2}
# Sorts records without a createdAt after every dated one.
_NEVER: Final = datetime.max.replace(tzinfo=UTC)
# The reason shown for a dead record whose member another record keeps (R5).
KEPT_FOR_ANOTHER_CLIENT: Final = "shared address: kept for another client"
# The suppression reason of an erasure request's identifiers: the only way a
# phone number reaches the suppression list (R3).
ERASURE_SUPPRESSION: Final = "erasure"


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
        unsubscribed_by_syncd: syncd itself set the member ``unsubscribed``
            (a governing record without consent, a restriction, no client, or
            an opt-out already on record in ``opted_out_at``), so that status
            and its ``last_changed`` are not a new opt-out and withdraw nobody's
            consent. The task runner sets it when such an unsubscribe is done;
            a done subscribe, or the member seen marketed again, clears it.
    """

    suppressed: bool = False
    restricted: bool = False
    opted_out_at: datetime | None = None
    opted_in_at: datetime | None = None
    synced_email: str | None = None
    resubscribe_refused: bool = False
    unsubscribed_by_syncd: bool = False


@dataclass(frozen=True, slots=True)
class Governance:
    """Which Phorest records speak for one address (see the module docstring).

    Attributes:
        governing: the records of the best tier present, the name source first.
        live: every active or archived record at the address: a Mailchimp
            opt-out there withdraws consent on each of them.
        kept: dead records at an address a live record governs: their
            deletion, merge or forget does not erase the member.
        tier: the governing tier (``active``, ``archived`` or ``dead``), or
            None when no record holds the address.
    """

    governing: tuple[ClientRecord, ...] = ()
    live: tuple[ClientRecord, ...] = ()
    kept: tuple[ClientRecord, ...] = ()
    tier: str | None = None

    @property
    def primary(self) -> ClientRecord | None:
        """The record the member's names come from, or None."""
        return self.governing[0] if self.governing else None

    @property
    def others(self) -> tuple[ClientRecord, ...]:
        """Every record at the address but :attr:`primary`."""
        primary = self.primary
        return tuple(c for c in (*self.live, *self.dead) if c is not primary)

    @property
    def dead(self) -> tuple[ClientRecord, ...]:
        """The dead records at the address (governing or kept)."""
        return self.kept if self.tier != TIER_DEAD else self.governing

    @property
    def shared(self) -> bool:
        """Whether more than one Phorest record uses the address."""
        return len(self.live) + len(self.dead) > 1

    @property
    def consent(self) -> bool:
        """Whether every governing record consents to email marketing."""
        return bool(self.governing) and all(c.email_consent for c in self.governing)

    def describe(self) -> tuple[str, str]:
        """(what shares the address, who governs it), e.g. ("active+archived", "active")."""
        states = sorted((c.state for c in (*self.live, *self.dead)), key=_state_order)
        return "+".join(states), self.tier or "-"


def govern(records: Iterable[ClientRecord]) -> Governance:
    """Decide who speaks for one address, from every Phorest record holding it.

    The order records arrive in changes nothing. A client id seen twice counts
    once, as its most recently updated version (a poll may hold both the change
    feed's copy and a lookup's).

    Args:
        records: the Phorest records whose email is the address (any state).

    Returns:
        The governance; empty when there is no record.
    """
    newest: dict[str, ClientRecord] = {}
    for record in records:
        held = newest.get(record.client_id)
        if held is None or (record.updated_at, record.version) > (held.updated_at, held.version):
            newest[record.client_id] = record
    if not newest:
        return Governance()
    ordered = sorted(newest.values(), key=_name_source_order)
    tiers = [tier_of_state(c.state) for c in ordered]
    tier = min(tiers, key=_TIER_RANK.__getitem__)
    live = tuple(c for c, t in zip(ordered, tiers) if t != TIER_DEAD)
    dead = tuple(c for c, t in zip(ordered, tiers) if t == TIER_DEAD)
    governing = tuple(c for c, t in zip(ordered, tiers) if t == tier)
    return Governance(governing, live, dead if live else (), tier)


def _name_source_order(client: ClientRecord) -> tuple[datetime, str]:
    """Created first, then the lowest client id: fixed for a record's life."""
    return (client.created_at or _NEVER, client.client_id)


def _state_order(state: str) -> tuple[int, str]:
    return (_TIER_RANK[tier_of_state(state)], state)


def tier_of_state(state: str) -> str:
    """The governance tier of a Phorest client state."""
    if state in ERASED_CLIENT_STATES:
        return TIER_DEAD
    return TIER_ARCHIVED if state == "archived" else TIER_ACTIVE


@dataclass(frozen=True, slots=True)
class Housemate:
    """Another Phorest record at a view's address.

    Attributes:
        subject_key: the record's own subject key (its tasks are its own).
        client: the record.
        opted_in_at: as :attr:`LedgerFacts.opted_in_at`, for this record.
    """

    subject_key: str
    client: ClientRecord
    opted_in_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SubjectView:
    """Everything :func:`plan` needs about one address.

    Attributes:
        subject_key: the HMAC key of the subject the address's facts belong to
            (the primary record's, or the address's own when no client holds it).
        client: the address's primary Phorest record (:attr:`Governance.primary`
            of every record there), or None.
        member: the Mailchimp member at the client's address, or at
            ``facts.synced_email`` when the address changed, or None.
        facts: what the ledger knows.
        housemates: every other Phorest record at the address, with its own
            subject key (a family member, a duplicate, a merged-away record).

    Raises:
        ValueError: a live client's member is at neither the client's address
            nor the synced one, or ``client`` is not the primary of the
            records given (the messages hold no address).
    """

    subject_key: str
    client: ClientRecord | None
    member: MemberRecord | None
    facts: LedgerFacts = LedgerFacts()
    housemates: tuple[Housemate, ...] = ()
    # What governance() found, worked out once (planning asks again; a resync plans
    # every address). Not part of the view's value.
    _governance: Governance | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        client, member = self.client, self.member
        if client is None:
            if self.housemates:
                raise ValueError("housemates without a client")
            return
        if self.housemates and self.governance().primary is not client:
            raise ValueError("client is not the primary record of its address")
        if client.state in ERASED_CLIENT_STATES:
            return
        if member is None or member.status == "absent":
            return
        if not (_same(member.email, client.email) or _same(member.email, self.facts.synced_email)):
            # Acting on it could move or rename someone else's member.
            raise ValueError("member is at neither the client's address nor the synced one")

    def governance(self) -> Governance:
        """:func:`govern` over the client and its housemates."""
        if self._governance is None:
            governance = Governance() if self.client is None else govern(
                (self.client, *(mate.client for mate in self.housemates)))
            object.__setattr__(self, "_governance", governance)  # frozen: set once
            return governance
        return self._governance

    def own(self, client: ClientRecord) -> tuple[str, datetime | None]:
        """(subject key, opted_in_at) of the client or one of its housemates."""
        if client is self.client:
            return self.subject_key, self.facts.opted_in_at
        mate = next(mate for mate in self.housemates if mate.client is client)
        return mate.subject_key, mate.opted_in_at


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
        if member is None:
            return []
        rule: Rule = "R3" if facts.suppressed else "R5"
        return [_mailchimp("erase", key, member.email, client_id, rule, erased)]

    if facts.restricted or client is None:
        if member is None or member.status not in MARKETED_STATUSES:
            return []
        why = "restricted" if facts.restricted else "no_client_in_phorest"
        return [_mailchimp("unsubscribe", key, member.email, client_id, "R1", why)]

    planned: list[Planned] = []
    governance = view.governance()
    opt_out = None
    for record in governance.live:
        # The mailbox said stop: every live record there loses its consent,
        # unless its own opt-in in Phorest is newer than the opt-out.
        record_key, opted_in_at = view.own(record)
        against = _standing_opt_out(member, facts, opted_in_at)
        if against is not None and record.email_consent:
            # The record as read travels with the action: one PUT in the common case.
            read_at = record.read_at.isoformat() if record.read_at else None
            action = Action("withdraw_consent", record_key, client_id=record.client_id,
                            record=record.raw, read_at=read_at)
            planned.append(Planned("phorest", action, "R2", against))
        if against is not None and record in governance.governing:
            opt_out = opt_out or against
    if opt_out is not None or not governance.consent:
        if member is not None and member.status in MARKETED_STATUSES:
            # A standing opt-out is R2 propagating; otherwise consent was never there (R1).
            rule = "R2" if opt_out is not None else "R1"
            why = opt_out or _no_consent_reason(governance)
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


def plan_analytics_erasure(
    subject_key: str,
    client: ClientRecord,
    *,
    identity: str,
    erased_before: bool,
    email: str | None,
    shared: bool,
) -> Planned | None:
    """Whether GA must be asked to delete a client Phorest shows as dead (R5, GA side).

    GA cannot be read back, so each dead client is asked for once
    (``erased_before`` says it was). GA knows a person by the Phorest client id
    (``identity`` ``user_id`` or ``client_id``) or by their address
    (``email``): then a forgotten client, whose address Phorest blanked, cannot
    be named, and an address a live client still uses (``shared``) is left
    alone, since deleting it would delete that client's data too.

    Args:
        subject_key: the client's subject key.
        client: the record (any state; only dead ones are planned).
        identity: ``[google_analytics] identity``.
        erased_before: GA was already asked to delete this subject.
        email: the client's normalised address, if Phorest still shows one.
        shared: a live Phorest client uses the same address.

    Returns:
        The ``erase`` for GA, or None.
    """
    if client.state not in ERASED_CLIENT_STATES or erased_before:
        return None
    if identity == "email" and (email is None or shared):
        return None
    action = Action("erase", subject_key, email=email, client_id=client.client_id)
    return Planned("google_analytics", action, "R5", f"client_{client.state}")


def _erasure_reason(view: SubjectView) -> str | None:
    """Why the subject must be erased from Mailchimp, or None."""
    if view.facts.suppressed:
        return "suppressed"
    if view.client is not None and view.client.state in ERASED_CLIENT_STATES:
        return f"client_{view.client.state}"
    return None


def _no_consent_reason(governance: Governance) -> str:
    """Why a member without consent is unsubscribed (R1)."""
    if governance.primary is not None and governance.primary.email_consent:
        return "no_consent_from_another_client_at_address"
    return "no_consent_in_phorest"


def _standing_opt_out(
    member: MemberRecord | None, facts: LedgerFacts, opted_in_at: datetime | None
) -> str | None:
    """The reason an opt-out overrides Phorest's consent, or None if there is none.

    The opt-out's time is the newest of the ledger's record and, for a member
    in compliance state, Mailchimp's ``last_changed``. Phorest's opt-in wins
    only if it is known and strictly newer than a known opt-out time. An
    ``unsubscribed`` status syncd set itself is nobody's opt-out.
    """
    opted_out = member is not None and member.status in OPTED_OUT_STATUSES and not (
        member.status == "unsubscribed" and facts.unsubscribed_by_syncd
    )
    if not opted_out and facts.opted_out_at is None:
        return None
    candidates = [facts.opted_out_at, member.last_changed if opted_out and member else None]
    times = [t for t in candidates if t is not None]
    if times and opted_in_at is not None and opted_in_at > max(times):
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
