"""Deterministic synthetic data: a salon's clients and a Mailchimp audience that has drifted.

The same seed, client count and clock give the same world. The mix is meant
to exercise every rule syncd enforces:

- Phorest clients with and without email-marketing consent, without an email,
  sharing a family email (and households that share one address in every
  combination: active with archived, two active with mixed consent, active
  with deleted, active with merged, a family of three), not seen for more than 24 months (some of those with
  a future appointment, which protects them from the purge), archived,
  deleted, merged into another client, and already forgotten.
- A Mailchimp audience that mostly matches the consenting clients, with a
  ``drift`` share of deliberate mistakes: stale subscriptions of clients who
  withdrew consent, orphans with no client at all, extra merge fields holding
  personal data (PHONE, ADDRESS, BIRTHDAY), members who unsubscribed in
  Mailchimp only, cleaned addresses, names that changed in Phorest only, and
  consenting clients missing from the audience.

All addresses are under reserved example domains and all phone numbers in
Ofcom's drama range (07700 9xxxxx), so nothing here is anyone's real data.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from syncd.sandbox.mailchimp import MailchimpEmulator
from syncd.sandbox.phorest import PhorestEmulator

FIRST_NAMES = (
    "Aoife Ciara Niamh Saoirse Emma Olivia Amelia Isla Ava Mia Grace Freya Sophie Chloe Ella "
    "Jack Noah Oliver Harry George Leo Oscar Finn Liam Conor Sean Arthur Theo Luca Adam"
).split()
LAST_NAMES = (
    "Murphy Kelly Byrne Ryan Walsh Smith Jones Taylor Brown Wilson Evans Thomas Roberts "
    "Johnson Lewis Walker Robinson Wood Thompson White Hughes Edwards Green Hall Clarke"
).split()
DOMAINS = ("example.com", "example.org", "example.net")

# Shares of the client population, drawn independently per client.
SHARE_CONSENT = 0.6
SHARE_NO_EMAIL = 0.06
SHARE_FAMILY_EMAIL = 0.03
SHARE_STALE = 0.12
SHARE_STALE_WITH_FUTURE_APPOINTMENT = 0.15  # of the stale ones
SHARE_ARCHIVED = 0.02
SHARE_DELETED = 0.01
SHARE_MERGED = 0.01
SHARE_FORGOTTEN = 0.005
DEFAULT_DRIFT = 0.2
# Clients without consent who are on the list as unsubscribed (they once were members).
SHARE_FORMER_SUBSCRIBERS = 0.9
YEARS_OF_HISTORY = 6
BRANCHES = (("Dublin Grafton Street", "branch-dublin"), ("London Soho", "branch-london"))
# Households: clients sharing one address in a chosen combination of states. Each
# kind names the fate of each record; they cycle so every kind occurs.
HOUSEHOLD_KINDS = (
    ("active+archived", ("active", "archived")),
    ("two_active_mixed_consent", ("active", "active")),
    ("active+deleted", ("active", "deleted")),
    ("active+merged", ("active", "merged")),
    ("family_of_three", ("active", "active", "active")),
)
CLIENTS_PER_HOUSEHOLD = 40  # one household per this many clients
# A separate stream, so households never shift the rest of a seeded world.
HOUSEHOLD_SEED_OFFSET = 7919


@dataclass
class SeedReport:
    """What the seeder made, by category (counts only: no personal data)."""

    clients: dict[str, int] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)

    def bump(self, table: dict[str, int], key: str, n: int = 1) -> None:
        """Add ``n`` to a category."""
        table[key] = table.get(key, 0) + n


def seed_world(
    phorest: PhorestEmulator,
    mailchimp: MailchimpEmulator | None,
    *,
    clients: int,
    seed: int = 0,
    drift: float = DEFAULT_DRIFT,
    members: int | None = None,
    clock: Callable[[], datetime] | None = None,
) -> SeedReport:
    """Fill the emulators with ``clients`` synthetic clients and a drifted audience.

    Args:
        phorest: the Phorest emulator to fill.
        mailchimp: the Mailchimp emulator to fill, or None for no audience.
        clients: how many clients to create, besides the households (one per
            :data:`CLIENTS_PER_HOUSEHOLD` clients) that share an address.
        seed: makes the world reproducible.
        drift: share (0..1) of audience entries that disagree with Phorest.
        members: if given and larger than what the clients produce, top the
            audience up to this size with newsletter-only subscribers (people
            who signed up on the website and never visited).
        clock: "now" for ages and visit dates (default: the real clock).

    Raises:
        ValueError: a negative count or a drift outside 0..1.
    """
    if clients < 0:
        raise ValueError("clients must be >= 0")
    if not 0 <= drift <= 1:
        raise ValueError("drift must be between 0 and 1")
    now = (clock or (lambda: datetime.now(UTC)))()
    rng = random.Random(seed)
    report = SeedReport()
    branch_ids = [phorest.add_branch(name=name, branch_id=bid)["branchId"] for name, bid in BRANCHES]
    kinds = _household_kinds(clients)
    made: list[dict[str, Any]] = []
    for i in range(clients):
        made.append(_client(phorest, rng, i, now, branch_ids, made, report))
    _post_process(phorest, rng, made, report)
    if mailchimp is not None:
        _audience(mailchimp, rng, made, drift, now, report)
        for n in range(report.members.get("total", 0), members or 0):
            changed = _iso(now - timedelta(days=rng.uniform(1, 900)))
            names = {"FNAME": rng.choice(FIRST_NAMES), "LNAME": rng.choice(LAST_NAMES)}
            email = f"newsletter.{n}@{DOMAINS[n % len(DOMAINS)]}"
            _member(mailchimp, report, "newsletter_only", email, "subscribed", names, changed)
    household_rng = random.Random(seed + HOUSEHOLD_SEED_OFFSET)
    for n, (kind, fates) in enumerate(kinds):
        _household(phorest, mailchimp, household_rng, n, kind, fates, now, branch_ids, report)
    return report


def _household_kinds(clients: int) -> list[tuple[str, tuple[str, ...]]]:
    """The households of a world of ``clients``: one per :data:`CLIENTS_PER_HOUSEHOLD`.

    Their clients come on top of ``clients`` (counted as ``household`` in the
    report), so a seed's other clients and members stay what they were.
    """
    count = clients // CLIENTS_PER_HOUSEHOLD
    return [HOUSEHOLD_KINDS[n % len(HOUSEHOLD_KINDS)] for n in range(count)]


def _household(
    phorest: PhorestEmulator,
    mailchimp: MailchimpEmulator | None,
    rng: random.Random,
    n: int,
    kind: str,
    fates: tuple[str, ...],
    now: datetime,
    branch_ids: list[str],
    report: SeedReport,
) -> None:
    """Clients sharing one address, with random consents and change times, and its member.

    Later records are often updated more recently than the first (an archived
    duplicate touched last, say), so "the newest record governs" would be wrong.
    """
    email = f"household.{n}@{DOMAINS[n % len(DOMAINS)]}"
    last = rng.choice(LAST_NAMES)
    made = []
    for i, fate in enumerate(fates):
        created = now - timedelta(days=rng.uniform(60, 365 * 4))
        first = rng.choice(FIRST_NAMES)
        consent = rng.random() < 0.7
        updated = now - timedelta(days=rng.uniform(1, 50))
        client = phorest.add_client(
            firstName=first, lastName=last, email=email,
            mobile=f"4477008{(n * 4 + i) % 100000:05d}",
            emailMarketingConsent=consent, smsMarketingConsent=False,
            emailReminderConsent=True, smsReminderConsent=True,
            createdAt=_iso(created), updatedAt=_iso(max(created, updated)),
            clientSince=_iso(created), lastVisit=(now - timedelta(days=20)).date().isoformat(),
            creatingBranchId=branch_ids[i % len(branch_ids)],
        )  # fmt: skip
        made.append(client)
        report.bump(report.clients, "total")
        report.bump(report.clients, "household")
        report.bump(report.clients, "consent" if consent else "no_consent")
    for client, fate in zip(made, fates):
        if fate == "archived":
            phorest.archive(client["clientId"])
        elif fate == "deleted":
            phorest.delete(client["clientId"])
        elif fate == "merged":
            phorest.merge(client["clientId"], made[0]["clientId"])
    report.bump(report.clients, f"household_{kind}")
    if mailchimp is None:
        return
    status = rng.choice(("subscribed", "subscribed", "unsubscribed", "absent"))
    if status != "absent":
        named = rng.choice(made)
        names = {"FNAME": named["firstName"], "LNAME": named["lastName"]}
        changed = _iso(now - timedelta(days=rng.uniform(60, 900)))
        _member(mailchimp, report, f"household_{status}", email, status, names, changed)


def _client(
    phorest: PhorestEmulator,
    rng: random.Random,
    i: int,
    now: datetime,
    branch_ids: list[str],
    made: list[dict[str, Any]],
    report: SeedReport,
) -> dict[str, Any]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    created = now - timedelta(days=rng.uniform(30, 365 * YEARS_OF_HISTORY))
    stale = rng.random() < SHARE_STALE
    if stale:
        # Last seen more than 24 months ago (and created before that).
        created = min(created, now - timedelta(days=365 * 3))
        last_visit = now - timedelta(days=rng.uniform(740, (now - created).days))
    else:
        last_visit = now - timedelta(days=rng.uniform(1, min(700, (now - created).days + 1)))
    email: str | None = f"{first}.{last}.{i}@{DOMAINS[i % len(DOMAINS)]}".lower()
    kind = "normal"
    if rng.random() < SHARE_NO_EMAIL:
        email, kind = None, "no_email"
    elif made and rng.random() < SHARE_FAMILY_EMAIL:
        relative = made[rng.randrange(len(made))]
        if relative["email"]:
            email, last, kind = relative["email"], relative["lastName"], "family_email"
    consent = rng.random() < SHARE_CONSENT and email is not None
    client = phorest.add_client(
        firstName=first.title(),
        lastName=last.title(),
        email=email,
        mobile=f"4477009{i % 100000:05d}",
        emailMarketingConsent=consent,
        smsMarketingConsent=consent and rng.random() < 0.5,
        emailReminderConsent=True,
        smsReminderConsent=True,
        createdAt=_iso(created),
        updatedAt=_iso(max(created, last_visit)),
        clientSince=_iso(created),
        firstVisit=(created + timedelta(days=1)).date().isoformat(),
        lastVisit=last_visit.date().isoformat(),
        creatingBranchId=branch_ids[i % len(branch_ids)],
    )
    report.bump(report.clients, "total")
    report.bump(report.clients, kind)
    report.bump(report.clients, "consent" if consent else "no_consent")
    if stale:
        report.bump(report.clients, "stale_24_months")
        if rng.random() < SHARE_STALE_WITH_FUTURE_APPOINTMENT:
            phorest.add_appointment(
                branch_ids[0],
                clientId=client["clientId"],
                appointmentDate=(now.date() + timedelta(days=rng.randint(1, 60))).isoformat(),
                startTime="10:00:00.000",
                state="BOOKED",
                activationState="ACTIVE",
            )
            report.bump(report.clients, "stale_with_future_appointment")
    return {
        "clientId": client["clientId"],
        "email": email,
        "firstName": client["firstName"],
        "lastName": client["lastName"],
        "consent": consent,
        "fate": "active",
    }


def _post_process(
    phorest: PhorestEmulator, rng: random.Random, made: list[dict[str, Any]], report: SeedReport
) -> None:
    """Archive, delete, merge and forget a few clients, as years of salon life would."""
    for entry in made:
        roll = rng.random()
        edge = SHARE_ARCHIVED
        if roll < edge:
            phorest.archive(entry["clientId"])
            entry["fate"] = "archived"
        elif roll < (edge := edge + SHARE_DELETED):
            phorest.delete(entry["clientId"])
            entry["fate"] = "deleted"
        elif roll < (edge := edge + SHARE_MERGED) and len(made) > 1:
            survivor = made[rng.randrange(len(made))]
            if survivor is not entry and survivor["fate"] == "active":
                phorest.merge(entry["clientId"], survivor["clientId"])
                entry["fate"] = "merged"
        elif roll < edge + SHARE_FORGOTTEN:
            phorest.forget(entry["clientId"])
            entry["fate"] = "forgotten"
        if entry["fate"] != "active":
            report.bump(report.clients, entry["fate"])


def _audience(
    mailchimp: MailchimpEmulator,
    rng: random.Random,
    made: list[dict[str, Any]],
    drift: float,
    now: datetime,
    report: SeedReport,
) -> None:
    """Members for the consenting clients, with a ``drift`` share of them wrong on purpose."""
    seen: set[str] = set()
    for entry in made:
        email = entry["email"]
        if not email or email in seen:
            continue
        seen.add(email)
        changed = _iso(now - timedelta(days=rng.uniform(1, 900)))
        names = {"FNAME": entry["firstName"], "LNAME": entry["lastName"]}
        drifted = rng.random() < drift
        if entry["consent"] and entry["fate"] == "active":
            if not drifted:
                _member(mailchimp, report, "in_sync", email, "subscribed", names, changed)
                continue
            choice = rng.choice(
                ("missing", "unsubscribed_in_mailchimp_only", "extra_merge_fields", "renamed",
                 "cleaned")
            )
            if choice == "missing":
                report.bump(report.members, "consenting_client_missing")
            elif choice == "unsubscribed_in_mailchimp_only":
                _member(mailchimp, report, choice, email, "unsubscribed", names, changed)
            elif choice == "extra_merge_fields":
                extra = {
                    **names,
                    "PHONE": "07700 900" + f"{rng.randrange(1000):03d}",
                    "ADDRESS": f"{rng.randrange(1, 200)} High Street, Example Town",
                    "BIRTHDAY": f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}",
                }
                _member(mailchimp, report, choice, email, "subscribed", extra, changed)
            elif choice == "renamed":
                stale_names = {"FNAME": entry["firstName"], "LNAME": "Previous-Surname"}
                _member(mailchimp, report, "name_changed_in_phorest", email, "subscribed",
                        stale_names, changed)
            else:
                _member(mailchimp, report, choice, email, "cleaned", names, changed)
        elif drifted:
            # No consent, or the client is gone: the member should not be subscribed.
            _member(mailchimp, report, "stale_subscription", email, "subscribed", names, changed)
        elif not entry["consent"] and rng.random() < SHARE_FORMER_SUBSCRIBERS:
            # Honest history: people who once unsubscribed stay on the list as unsubscribed.
            _member(mailchimp, report, "in_sync_unsubscribed", email, "unsubscribed", names, changed)
    orphans = int(len(seen) * drift * 0.1)
    for n in range(orphans):
        email = f"orphan.{n}@{DOMAINS[n % len(DOMAINS)]}"
        changed = _iso(now - timedelta(days=rng.uniform(1, 900)))
        _member(mailchimp, report, "orphan", email, "subscribed",
                {"FNAME": rng.choice(FIRST_NAMES), "LNAME": rng.choice(LAST_NAMES)}, changed)


def _member(
    mailchimp: MailchimpEmulator,
    report: SeedReport,
    category: str,
    email: str,
    status: str,
    merge_fields: dict[str, str],
    last_changed: str,
) -> None:
    mailchimp.add_member(email, status, merge_fields=merge_fields, last_changed=last_changed)
    report.bump(report.members, "total")
    report.bump(report.members, category)


def _iso(moment: datetime | date) -> str:
    if isinstance(moment, datetime):
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.isoformat()
