"""Tests for syncd.rights: data-subject requests against a real ledger, with fake connectors.

Phorest and Mailchimp are small in-memory fakes with the methods the code
calls (``client``, ``find_by_email``, ``find_by_phone``, ``member``, ``scan``);
tasks are carried out by :func:`syncd.tasks.run_due` through fake processors
that answer with scripted outcomes, so every outcome is written the way the
daemon writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.base import Action, ClientRecord, MemberRecord, Outcome
from syncd import config, engine, rights
from syncd.identity import SubjectKeys
from syncd.ledger import Ledger
from syncd.retry import RetryPolicy
from syncd.rights import Person, RequestError
from syncd.tasks import run_due
from tests.support import FakeClock

# A 31st, so that "one calendar month later" has to clamp to February's end.
START = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
KEYS = SubjectKeys(b"rights-test-hmac-key-0123456789", "GB")
EMAIL = "jane.roe@example.org"
OTHER_EMAIL = "j.roe.work@example.net"
MOBILE_E164 = "+447700900123"
PAPER_FORMS = "paper_forms"
PERSONAL = (EMAIL, OTHER_EMAIL, "7700900123", "7700 900123")


def record(client_id: str, **changes: Any) -> ClientRecord:
    base = ClientRecord(
        client_id=client_id, email=EMAIL, mobile="07700 900123", first_name="Jane",
        last_name="Roe", email_consent=True, state="active", version=1, updated_at=START,
    )  # fmt: skip
    return replace(base, **changes)


def member(email: str = EMAIL, status: str = "subscribed") -> MemberRecord:
    return MemberRecord(email=email, status=status, first_name="Jane", last_name="Roe")  # type: ignore[arg-type]


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


class FakePhorest:
    """Phorest's client list: the ``phone`` filter compares the stored mobile as written.

    With ``ignores_phone_filter`` it answers every client instead (as Phorest
    does with a filter it does not know) and, like the connector, keeps the rows
    whose mobile ends in the same nine digits.
    """

    def __init__(self, *records: ClientRecord, ignores_phone_filter: bool = False) -> None:
        self.records = {r.client_id: r for r in records}
        self.ignores_phone_filter = ignores_phone_filter
        self.phone_spellings: list[str] = []

    def client(self, client_id: str) -> ClientRecord | None:
        return self.records.get(client_id)

    def find_by_email(self, email: str) -> list[ClientRecord]:
        return [r for r in self.records.values()
                if r.email and r.email.strip().casefold() == email.strip().casefold()]

    def find_by_phone(self, phone: str, spellings: Sequence[str] = ()) -> list[ClientRecord]:
        asked = list(dict.fromkeys((phone, *spellings)))
        self.phone_spellings += asked
        if self.ignores_phone_filter:
            return [r for r in self.records.values()
                    if r.mobile and _digits(r.mobile)[-9:] == _digits(phone)[-9:]]
        return [r for r in self.records.values() if r.mobile in asked]

    def scan(self) -> Iterator[ClientRecord]:
        return iter(list(self.records.values()))


class FakeMailchimp:
    """The audience, read one member at a time."""

    def __init__(self, *members: MemberRecord) -> None:
        self.members = {m.email: m for m in members}

    def member(self, email: str) -> MemberRecord | None:
        return self.members.get(email)

    def scan(self) -> Iterator[MemberRecord]:
        return iter(list(self.members.values()))


@dataclass
class FakeProcessor:
    """A processor whose ``apply`` answers each action with ``answer(action)``."""

    answer: Callable[[Action], Outcome]
    identity: str = "user_id"
    applied: list[Action] = field(default_factory=list)

    def apply(self, actions: Sequence[Action], dry_run: bool = False) -> list[Outcome]:
        self.applied += actions
        return [self.answer(a) for a in actions]


def done_with(request_id: str | None = None, evidence: str | None = None) -> FakeProcessor:
    return FakeProcessor(lambda a: Outcome(a, "done", "done", request_id=request_id,
                                           evidence=evidence))  # fmt: skip


def failing(reason: str) -> FakeProcessor:
    return FakeProcessor(lambda a: Outcome(a, "permanent", reason))


def make_settings(*manual: dict[str, Any], **policy: Any) -> config.Settings:
    return config.Settings(
        identity={"hmac_key": "k" * 32},
        phorest={"business_id": "salon", "username": "global/api@salon.example", "password": "p"},
        mailchimp={"api_key": "0123456789abcdef-us6", "list_id": "a1b2c3d4e5"},
        policy=policy,
        manual_processors=list(manual),
    )


PAPER = {"name": PAPER_FORMS, "instructions": "Shred the paper consultation forms",
         "confirmers": ["Ann Manager"]}  # fmt: skip
ANALYTICS = FakeProcessor(lambda a: Outcome(a, "done"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def ledger(tmp_path: Path, clock: FakeClock) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "ledger.sqlite3", clock=clock) as opened:
        yield opened


def file_request(
    ledger: Ledger,
    phorest: FakePhorest,
    mailchimp: FakeMailchimp,
    kind: str = "erase",
    *,
    settings: config.Settings | None = None,
    analytics: Any = ANALYTICS,
    **identifiers: str,
) -> int:
    """Resolve and file a request as ``syncd request`` does."""
    person = rights.resolve(phorest, KEYS, **identifiers)
    queue = engine.plan_addresses(ledger, {"phorest": phorest, "mailchimp": mailchimp}, KEYS,
                                  person.own_emails, person.holders)  # fmt: skip
    return rights.file(ledger, settings or make_settings(PAPER), KEYS, kind, person, queue,
                       filed_by="Ann Manager", now=START, analytics=analytics)  # fmt: skip


def carry_out(ledger: Ledger, **processors: FakeProcessor) -> None:
    run_due(ledger, processors, RetryPolicy(), KEYS, now=START)


def steps_by_processor(ledger: Ledger, request_id: int) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for step in ledger.steps(request_id):
        out.setdefault(step.processor, []).append((step.kind, step.state))
    return out


def assert_no_personal_data(text: str) -> None:
    lowered = text.lower()
    assert not [value for value in PERSONAL if value.lower() in lowered], text


# -- resolve -------------------------------------------------------------------------------


def test_resolve_by_email_finds_the_client_and_every_identifier_on_the_record() -> None:
    phorest = FakePhorest(record("c1", email="Jane.Roe@Example.org"))

    person = rights.resolve(phorest, KEYS, email=" JANE.ROE@example.org ")

    assert [c.client_id for c in person.clients] == ["c1"]
    assert person.subject_key == KEYS.client_id("c1")
    assert (person.source, person.emails, person.phones) == ("email", (EMAIL,), (MOBILE_E164,))
    assert person.shared_emails == () and person.own_emails == (EMAIL,)


@pytest.mark.parametrize("stored", ["447700900123", "07700 900123", "+44 7700 900123"])
@pytest.mark.parametrize("given", ["07700900123", "+44 7700 900123"])
def test_resolve_by_phone_finds_the_number_however_phorest_stores_it(
    stored: str, given: str
) -> None:
    phorest = FakePhorest(record("c1", mobile=stored), record("c2", email="x@example.com",
                                                                 mobile="07700 900999"))

    person = rights.resolve(phorest, KEYS, phone=given)

    assert [c.client_id for c in person.clients] == ["c1"]
    assert person.source == "phone" and person.phones == (MOBILE_E164,)
    assert stored in phorest.phone_spellings  # Phorest was asked in the stored spelling


def test_a_number_ending_in_the_same_digits_in_another_country_is_not_the_person() -> None:
    # +1 770 090 0123 ends in the same nine digits as 07700 900123.
    phorest = FakePhorest(record("c-us", mobile="+1 770 090 0123"), ignores_phone_filter=True)

    with pytest.raises(RequestError) as refused:
        rights.resolve(phorest, KEYS, phone="07700 900123")

    assert str(refused.value) == "no Phorest client has this phone number"


def test_resolve_by_client_id_reads_the_client() -> None:
    phorest = FakePhorest(record("c1"), record("c2", email=OTHER_EMAIL, mobile=None))

    person = rights.resolve(phorest, KEYS, client_id=" c1 ")

    assert [c.client_id for c in person.clients] == ["c1"]
    assert (person.source, person.emails, person.phones) == ("client_id", (EMAIL,), (MOBILE_E164,))


def test_an_unknown_client_id_is_refused_naming_it() -> None:
    with pytest.raises(RequestError, match=r"^no Phorest client has id c404$"):
        rights.resolve(FakePhorest(record("c1")), KEYS, client_id="c404")


def test_a_phone_number_phorest_does_not_hold_is_refused_without_repeating_it() -> None:
    with pytest.raises(RequestError) as refused:
        rights.resolve(FakePhorest(record("c1")), KEYS, phone="07700 900456")
    assert str(refused.value) == "no Phorest client has this phone number"


def test_an_email_phorest_does_not_hold_names_a_person_without_records() -> None:
    person = rights.resolve(FakePhorest(record("c1")), KEYS, email=OTHER_EMAIL)

    assert person.clients == () and person.primary is None
    assert person.subject_key == KEYS.email(OTHER_EMAIL)
    assert (person.emails, person.phones, person.source) == ((OTHER_EMAIL,), (), "email")


def test_an_email_two_clients_share_is_refused_with_both_client_ids() -> None:
    phorest = FakePhorest(record("c1"), record("c2", mobile="07700 900999"))

    with pytest.raises(RequestError) as refused:
        rights.resolve(phorest, KEYS, email=EMAIL)

    message = str(refused.value)
    assert "c1, c2" in message and "--client-id" in message
    assert_no_personal_data(message)


def test_an_email_and_a_phone_of_different_clients_are_refused_naming_both() -> None:
    phorest = FakePhorest(record("c1", mobile=None), record("c2", email=OTHER_EMAIL))

    with pytest.raises(RequestError) as refused:
        rights.resolve(phorest, KEYS, email=EMAIL, phone="07700 900123")

    message = str(refused.value)
    assert "different Phorest clients" in message
    assert "the email is client c1" in message and "the phone number is client c2" in message
    assert_no_personal_data(message)


@pytest.mark.parametrize("old_email", [EMAIL, OTHER_EMAIL], ids=["same-address", "own-address"])
def test_a_merged_away_record_and_its_survivor_are_one_person(old_email: str) -> None:
    survivor = record("c-new", mobile=None)
    merged = record("c-old", email=old_email, state="merged", merged_into="c-new")
    phorest = FakePhorest(survivor, merged)

    person = rights.resolve(phorest, KEYS, email=old_email)

    assert [c.client_id for c in person.clients] == ["c-new", "c-old"]  # the survivor first
    assert person.subject_key == KEYS.client_id("c-new")
    assert set(person.emails) == {EMAIL, old_email} and person.phones == (MOBILE_E164,)


@pytest.mark.parametrize(("other_state", "shared"), [("active", True), ("archived", True),
                                                     ("deleted", False)])  # fmt: skip
def test_an_address_another_live_client_uses_is_shared_not_the_persons_own(
    other_state: str, shared: bool
) -> None:
    phorest = FakePhorest(record("c1", mobile=None),
                          record("c2", mobile="07700 900999", state=other_state))  # fmt: skip

    person = rights.resolve(phorest, KEYS, email=EMAIL, client_id="c1")

    assert [c.client_id for c in person.clients] == ["c1"]
    assert person.shared_emails == ((EMAIL,) if shared else ())
    assert person.own_emails == (() if shared else (EMAIL,))


def test_an_address_on_the_persons_record_is_checked_for_sharing_too() -> None:
    phorest = FakePhorest(record("c1", email=OTHER_EMAIL),
                          record("c2", email=OTHER_EMAIL, mobile=None))  # fmt: skip

    person = rights.resolve(phorest, KEYS, phone="07700 900123")

    assert person.shared_emails == (OTHER_EMAIL,) and person.own_emails == ()


@pytest.mark.parametrize(
    ("identifiers", "message"),
    [({}, "give --email, --phone or --client-id"),
     ({"email": "not-an-address"}, "--email: not a valid email address"),
     ({"phone": "12"}, "--phone: not a valid phone number"),
     ({"client_id": "  "}, "--client-id: empty")],
    ids=["nothing", "email", "phone", "client-id"],
)
def test_malformed_identifiers_are_refused_without_repeating_them(
    identifiers: dict[str, str], message: str
) -> None:
    with pytest.raises(RequestError) as refused:
        rights.resolve(FakePhorest(record("c1")), KEYS, **identifiers)
    assert str(refused.value) == message


# -- file ----------------------------------------------------------------------------------


def test_filing_an_erasure_opens_every_processors_step_and_suppresses_every_key(
    ledger: Ledger,
) -> None:
    phorest, mailchimp = FakePhorest(record("c1")), FakeMailchimp(member())

    request_id = file_request(ledger, phorest, mailchimp, email=EMAIL)

    request = ledger.request(request_id)
    assert request is not None
    assert (request.kind, request.state, request.client_id, request.filed_by, request.source) == (
        "erase", "open", "c1", "Ann Manager", "email")
    assert request.due_at == datetime(2026, 2, 28, 9, 30, tzinfo=UTC)  # one calendar month
    assert steps_by_processor(ledger, request_id) == {
        "mailchimp": [("task", "waiting")],
        "google_analytics": [("task", "waiting")],
        "phorest": [("manual", "waiting")],
        PAPER_FORMS: [("manual", "waiting")],
    }
    tasks = {t.processor: t for t in ledger.tasks_for_request(request_id)}
    assert {p: t.action for p, t in tasks.items()} == {"mailchimp": "erase",
                                                       "google_analytics": "erase"}
    assert all(t.request_id == request_id and t.state == "pending" for t in tasks.values())
    steps = {s.processor: s for s in ledger.steps(request_id)}
    assert steps["phorest"].instructions == "In Phorest, open client c1 and use Client actions › Forget"
    assert steps[PAPER_FORMS].instructions == (
        f"Shred the paper consultation forms (client id c1, request #{request_id})")
    keys = [KEYS.email(EMAIL), KEYS.phone(MOBILE_E164), KEYS.client_id("c1")]
    assert ledger.suppressed_among(keys) == set(keys)
    assert ledger.subjects_for(keys) == dict.fromkeys(keys, KEYS.client_id("c1"))
    [filed] = ledger.find_audit(request_id=request_id)
    assert (filed.action, filed.outcome, filed.reason, filed.subject_key) == (
        "request_erase", "filed", "R3:request", KEYS.client_id("c1"))
    assert_no_personal_data(repr([filed, ledger.steps(request_id), ledger.request(request_id)]))


def test_an_erasure_leaves_an_address_another_client_uses_unsuppressed(ledger: Ledger) -> None:
    phorest = FakePhorest(record("c1"), record("c2", mobile=None))

    request_id = file_request(ledger, phorest, FakeMailchimp(member()), email=EMAIL,
                              client_id="c1")  # fmt: skip

    assert not ledger.is_suppressed(KEYS.email(EMAIL))
    assert ledger.is_suppressed(KEYS.client_id("c1"), KEYS.phone(MOBILE_E164))
    # The other client's member stays: nothing in the audience is the person's alone.
    mailchimp = [s for s in ledger.steps(request_id) if s.processor == "mailchimp"]
    assert [(s.state, s.task_id, s.evidence) for s in mailchimp] == [
        ("done", None, "no member at the person's addresses")]


def test_an_erasure_of_a_client_phorest_already_forgot_closes_the_phorest_step_at_once(
    ledger: Ledger,
) -> None:
    forgotten = record("c1", email=None, mobile=None, first_name="", last_name="",
                       state="forgotten")  # fmt: skip

    request_id = file_request(ledger, FakePhorest(forgotten), FakeMailchimp(), client_id="c1")

    [step] = [s for s in ledger.steps(request_id) if s.processor == "phorest"]
    assert (step.state, step.confirmed_by, step.evidence) == (
        "done", rights.VERIFIED_BY, "client c1 already forgotten")
    request = ledger.request(request_id)
    assert request is not None and request.state == "open"  # GA and paper forms still wait


def test_filing_a_restriction_restricts_the_person_and_plans_an_unsubscribe(
    ledger: Ledger,
) -> None:
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              "restrict", email=EMAIL)  # fmt: skip

    subject = ledger.subject(KEYS.client_id("c1"))
    assert subject is not None and subject.restricted
    [task] = ledger.tasks_for_request(request_id)
    assert (task.processor, task.action, task.state) == ("mailchimp", "unsubscribe", "pending")
    assert steps_by_processor(ledger, request_id) == {"mailchimp": [("task", "waiting")]}
    assert ledger.suppression_size() == 0


def test_a_request_with_nothing_to_do_is_closed_done_at_once(ledger: Ledger) -> None:
    request_id = file_request(ledger, FakePhorest(), FakeMailchimp(), "restrict", email=EMAIL)

    request = ledger.request(request_id)
    assert request is not None and request.state == "done" and request.closed_at == START
    assert ledger.steps(request_id) == []
    assert [(e.outcome, e.detail) for e in ledger.find_audit(request_id=request_id)] == [
        ("filed", "filed with email; shared addresses kept: 0"),
        ("done", "nothing to change anywhere"),
    ]


def test_lifting_a_restriction_is_done_at_once_and_consent_decides_from_then_on(
    ledger: Ledger,
) -> None:
    phorest = FakePhorest(record("c1"))
    file_request(ledger, phorest, FakeMailchimp(member()), "restrict", email=EMAIL)
    # syncd's own unsubscribe landed: the member is unsubscribed, by syncd.
    ledger.upsert_subject(KEYS.client_id("c1"), unsubscribed_by_syncd=True)
    lifted = file_request(ledger, phorest, FakeMailchimp(member(status="unsubscribed")),
                          "unrestrict", email=EMAIL)  # fmt: skip

    request = ledger.request(lifted)
    assert request is not None and request.state == "done" and ledger.steps(lifted) == []
    subject = ledger.subject(KEYS.client_id("c1"))
    assert subject is not None and not subject.restricted
    # The subscribe consent asks for is queued as ordinary work, with the request as evidence.
    [task] = ledger.tasks_for_request(lifted)
    assert (task.processor, task.action, task.state) == ("mailchimp", "subscribe", "pending")
    assert [(e.outcome, e.detail) for e in ledger.find_audit(request_id=lifted)][-1] == (
        "done", "restriction lifted; consent decides from now on")


def test_an_unknown_request_kind_is_refused_before_anything_is_written(ledger: Ledger) -> None:
    person = Person(KEYS.email(EMAIL), "email", emails=(EMAIL,))
    with pytest.raises(RequestError, match="unknown request kind"):
        rights.file(ledger, make_settings(), KEYS, "export", person, list, now=START)
    assert ledger.all_requests() == []


# -- advance -------------------------------------------------------------------------------


def test_task_steps_close_with_the_vendors_evidence(ledger: Ledger) -> None:
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              email=EMAIL)  # fmt: skip
    carry_out(ledger, mailchimp=done_with(request_id="mc-req-7"),
              google_analytics=done_with(evidence="deletionRequestTime=2026-01-31T09:30:00Z"))

    progress = rights.advance(ledger, now=START)

    assert progress.closed_steps == 2
    steps = {s.processor: s for s in ledger.steps(request_id)}
    assert (steps["mailchimp"].state, steps["mailchimp"].evidence) == ("done", "request id mc-req-7")
    assert (steps["google_analytics"].state, steps["google_analytics"].evidence) == (
        "done", "deletionRequestTime=2026-01-31T09:30:00Z")
    facts = ledger.subject_facts([KEYS.client_id("c1")])[KEYS.client_id("c1")]
    assert facts.analytics_erased_at == START  # GA cannot be read back: remembered
    request = ledger.request(request_id)
    assert request is not None and request.state == "open"  # Phorest and paper forms wait


def test_a_failed_task_fails_its_step_and_the_request_stays_open(ledger: Ledger) -> None:
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              email=EMAIL)  # fmt: skip
    carry_out(ledger, mailchimp=failing("member_refused"), google_analytics=done_with())

    rights.advance(ledger, now=START)

    [step] = [s for s in ledger.steps(request_id) if s.processor == "mailchimp"]
    assert step.state == "failed"
    assert step.evidence == f"task {step.task_id} failed: member_refused"
    request = ledger.request(request_id)
    assert request is not None and request.state == "open"


def test_a_pending_task_leaves_its_step_waiting(ledger: Ledger) -> None:
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              email=EMAIL)  # fmt: skip

    assert rights.advance(ledger, now=START).closed_steps == 0
    assert {s.state for s in ledger.steps(request_id)} == {"waiting"}


@pytest.mark.parametrize(
    ("now_in_phorest", "closed", "shown"),
    [({"state": "forgotten", "email": None}, True, "forgotten"),
     ({"state": "deleted"}, True, "deleted"),
     (None, True, "gone"),
     ({"state": "active"}, False, None),
     ({"state": "archived"}, False, None)],
    ids=["forgotten", "deleted", "404", "active", "archived"],
)
def test_the_phorest_step_is_verified_by_reading_the_client(
    ledger: Ledger, now_in_phorest: dict[str, Any] | None, closed: bool, shown: str | None
) -> None:
    phorest = FakePhorest(record("c1"))
    request_id = file_request(ledger, phorest, FakeMailchimp(member()), email=EMAIL)
    if now_in_phorest is None:
        del phorest.records["c1"]
    else:
        phorest.records["c1"] = replace(phorest.records["c1"], **now_in_phorest)

    progress = rights.advance(ledger, phorest=phorest, now=START)

    [step] = [s for s in ledger.steps(request_id) if s.processor == "phorest"]
    assert progress.verified == int(closed)
    assert step.state == ("done" if closed else "waiting")
    audit = [e for e in ledger.find_audit(request_id=request_id) if e.action == "forget_client"]
    if closed:
        assert (step.confirmed_by, step.evidence) == (rights.VERIFIED_BY,
                                                      f"Phorest shows client c1 {shown}")
        assert [(e.processor, e.outcome, e.detail) for e in audit] == [
            ("phorest", "done", f"verified: client {shown} in Phorest")]
    else:
        assert step.confirmed_by is None and audit == []


def test_forget_steps_are_verified_a_bounded_number_at_a_time_in_rotation(
    ledger: Ledger,
) -> None:
    people = [record(f"c{n}", email=f"p{n}@example.com", mobile=None) for n in range(5)]
    phorest = FakePhorest(*people)
    requests = [file_request(ledger, phorest, FakeMailchimp(), client_id=p.client_id)
                for p in people]  # fmt: skip
    for person in people:  # staff pressed Forget for everyone
        phorest.records[person.client_id] = replace(person, state="forgotten", email=None)
    reads: list[int] = []

    def verify(after: int) -> rights.Advanced:
        return rights.advance(ledger, phorest=phorest, now=START, verify_after=after,
                              verify_limit=2, on_read=lambda: reads.append(1))

    first = verify(0)
    assert (first.verified, len(reads)) == (2, 2)
    second = verify(first.last_verified)
    assert (second.verified, len(reads)) == (2, 4) and second.last_verified > first.last_verified
    third = verify(second.last_verified)
    # The end was reached: the next run starts from the first, never reads nothing.
    assert third.verified == 1 and third.last_verified == 0
    assert all(ledger.request(r).state == "open" for r in requests)  # paper forms still wait
    assert all(s.state == "done" for r in requests for s in ledger.steps(r)
               if s.processor == "phorest")


def test_a_verification_stopped_between_reads_keeps_what_it_verified_and_nothing_else(
    ledger: Ledger,
) -> None:
    """The daemon's watchdog beat and SIGTERM land between Phorest reads (``on_read``)."""
    people = [record(f"c{n}", email=f"p{n}@example.com", mobile=None) for n in range(3)]
    phorest = FakePhorest(*people)
    for person in people:
        file_request(ledger, phorest, FakeMailchimp(), client_id=person.client_id)
        phorest.records[person.client_id] = replace(person, state="forgotten", email=None)
    reads: list[int] = []

    class Stop(Exception):
        pass

    def beat() -> None:
        reads.append(1)
        if len(reads) == 2:
            raise Stop

    with pytest.raises(Stop):
        rights.advance(ledger, phorest=phorest, now=START, on_read=beat)
    forget = [s for s in ledger.open_steps() if s.processor == "phorest"]
    done = [s for r in ledger.all_requests() for s in ledger.steps(r.id)
            if s.processor == "phorest" and s.state == "done"]  # fmt: skip
    # The first read closed its step; the second was read but stopped before closing.
    assert (len(reads), len(done), len(forget)) == (2, 1, 2)
    assert rights.advance(ledger, phorest=phorest, now=START).verified == 2


def test_a_request_completes_once_every_step_is_done(ledger: Ledger) -> None:
    phorest = FakePhorest(record("c1"))
    request_id = file_request(ledger, phorest, FakeMailchimp(member()), email=EMAIL,
                              settings=make_settings())  # fmt: skip
    carry_out(ledger, mailchimp=done_with(request_id="mc-1"), google_analytics=done_with())
    assert rights.advance(ledger, phorest=phorest, now=START).completed == []
    phorest.records["c1"] = replace(phorest.records["c1"], state="forgotten", email=None)

    progress = rights.advance(ledger, phorest=phorest, now=START)

    assert progress.completed == [request_id]
    request = ledger.request(request_id)
    assert request is not None and request.state == "done"
    done = [e for e in ledger.find_audit(request_id=request_id) if e.action == "request_erase"]
    assert [(e.outcome, e.detail) for e in done] == [
        ("filed", "filed with email; shared addresses kept: 0"), ("done", "all 3 step(s) done")]
    assert rights.advance(ledger, phorest=phorest, now=START).completed == []  # only once


# -- confirm -------------------------------------------------------------------------------


@pytest.fixture
def erasure(ledger: Ledger) -> int:
    """An erasure of c1 whose Mailchimp erase failed and whose GA deletion still waits."""
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              email=EMAIL)  # fmt: skip
    carry_out(ledger, mailchimp=failing("member_refused"))
    rights.advance(ledger, now=START)
    return request_id


@pytest.mark.parametrize(
    ("processor", "by", "message"),
    [("sms_provider", "Ann Manager", "has no 'sms_provider' step (its processors: "
      "google_analytics, mailchimp, paper_forms, phorest)"),
     (PAPER_FORMS, "Bob Trainee", "'Bob Trainee' may not confirm paper_forms (allowed: Ann Manager"),
     ("google_analytics", "Ann Manager", "syncd carries out the google_analytics step of request "
      "#1 itself")],
    ids=["wrong-processor", "confirmer-not-allowed", "task-still-pending"],
)
def test_confirm_refuses_what_a_person_may_not_confirm(
    ledger: Ledger, erasure: int, processor: str, by: str, message: str
) -> None:
    before = ledger.steps(erasure)

    with pytest.raises(RequestError) as refused:
        rights.confirm(ledger, make_settings(PAPER), erasure, processor, by=by, now=START)

    assert message in str(refused.value)
    assert ledger.steps(erasure) == before


def test_a_failed_task_step_can_be_confirmed_as_done_by_hand(ledger: Ledger, erasure: int) -> None:
    progress = rights.confirm(ledger, make_settings(PAPER), erasure, "mailchimp", by="Bob",
                              now=START)  # fmt: skip

    [step] = [s for s in ledger.steps(erasure) if s.processor == "mailchimp"]
    assert progress.closed_steps == 1
    assert (step.state, step.confirmed_by, step.evidence) == ("done", "Bob", "confirmed by Bob")
    [audit] = [e for e in ledger.find_audit(request_id=erasure) if e.action == "manual_step"]
    assert (audit.processor, audit.outcome, audit.detail, audit.subject_key) == (
        "mailchimp", "done", "confirmed by Bob", KEYS.client_id("c1"))


def test_confirming_a_step_already_done_is_refused(ledger: Ledger, erasure: int) -> None:
    settings = make_settings(PAPER)
    rights.confirm(ledger, settings, erasure, PAPER_FORMS, by="Ann Manager", now=START)

    with pytest.raises(RequestError, match=f"the paper_forms step of request #{erasure} is "
                                           "already done"):  # fmt: skip
        rights.confirm(ledger, settings, erasure, PAPER_FORMS, by="Ann Manager", now=START)


def test_the_last_confirmation_completes_the_request(ledger: Ledger, erasure: int) -> None:
    settings = make_settings(PAPER)
    carry_out(ledger, google_analytics=done_with())
    rights.advance(ledger, now=START)
    for processor in ("mailchimp", "phorest"):
        rights.confirm(ledger, settings, erasure, processor, by="Ann Manager", now=START)

    progress = rights.confirm(ledger, settings, erasure, PAPER_FORMS, by="Ann Manager", now=START)

    assert progress.completed == [erasure]
    with pytest.raises(RequestError, match=f"request #{erasure} is already done"):
        rights.confirm(ledger, settings, erasure, "phorest", by="Ann Manager", now=START)


def test_confirming_an_unknown_request_is_refused(ledger: Ledger) -> None:
    with pytest.raises(RequestError, match=r"no request #42 \(see syncd requests --all\)"):
        rights.confirm(ledger, make_settings(), 42, "phorest", by="Ann", now=START)


# -- extend --------------------------------------------------------------------------------


def test_a_request_can_be_extended_twice_by_a_month_and_then_no_more(
    ledger: Ledger, erasure: int
) -> None:
    settings = make_settings(PAPER)

    once = rights.extend(ledger, settings, erasure, 1, "  complex:  many   records ")
    twice = rights.extend(ledger, settings, erasure, 1, "still waiting on the paper archive")
    with pytest.raises(RequestError, match="at most 2 months in all .*already has 2"):
        rights.extend(ledger, settings, erasure, 1, "more")

    # Calendar months from the day it was received (31 January): no day drift.
    assert (once.extended_months, once.due_at) == (1, datetime(2026, 3, 31, 9, 30, tzinfo=UTC))
    assert (twice.extended_months, twice.due_at) == (2, datetime(2026, 4, 30, 9, 30, tzinfo=UTC))
    assert twice.extension_reason == "still waiting on the paper archive"
    stored = ledger.request(erasure)
    assert stored is not None and stored.due_at == twice.due_at
    extensions = [e for e in ledger.find_audit(request_id=erasure) if e.action == "extend_request"]
    assert [(e.reason, e.detail) for e in extensions] == [
        ("R11:art_12_3", "+1 month(s), due 2026-03-31"),
        ("R11:art_12_3", "+1 month(s), due 2026-04-30")]


@pytest.mark.parametrize(("months", "reason", "message"), [
    (3, "complex", "at most 2 months in all"),
    (0, "complex", "--months must be 1 or 2"),
    (1, "   ", "--reason must say why"),
], ids=["three-months", "zero-months", "no-reason"])  # fmt: skip
def test_an_extension_out_of_bounds_or_without_a_reason_changes_nothing(
    ledger: Ledger, erasure: int, months: int, reason: str, message: str
) -> None:
    before = ledger.request(erasure)

    with pytest.raises(RequestError, match=message):
        rights.extend(ledger, make_settings(), erasure, months, reason)

    assert ledger.request(erasure) == before


def test_the_due_date_follows_the_configured_deadline(ledger: Ledger, erasure: int) -> None:
    extended = rights.extend(ledger, make_settings(request_deadline_months=3), erasure, 2, "why")
    assert extended.due_at == datetime(2026, 6, 30, 9, 30, tzinfo=UTC)  # 31 Jan + 5 months


# -- cancel --------------------------------------------------------------------------------


def test_cancelling_before_anything_was_erased_cancels_the_work_and_lifts_suppression(
    ledger: Ledger,
) -> None:
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              email=EMAIL)  # fmt: skip
    other = ledger.add_request("erase", "someone-else", "email", START + timedelta(days=30))
    ledger.suppress("someone-elses-key", "erasure", other)

    cancelled = rights.cancel(ledger, request_id, "filed for the wrong client")

    assert (cancelled.state, cancelled.note) == ("cancelled", "cancelled: filed for the wrong client")
    assert {t.state for t in ledger.tasks_for_request(request_id)} == {"cancelled"}
    assert {s.state for s in ledger.steps(request_id)} == {"cancelled"}
    assert not ledger.is_suppressed(KEYS.email(EMAIL), KEYS.phone(MOBILE_E164),
                                    KEYS.client_id("c1"))  # fmt: skip
    assert ledger.is_suppressed("someone-elses-key")  # another request's entry stays
    [audit] = [e for e in ledger.find_audit(request_id=request_id) if e.outcome == "cancelled"
               and e.action == "request_erase"]  # fmt: skip
    assert audit.detail == "tasks cancelled: 2; suppression entries lifted: 3"


def test_cancelling_after_a_processor_erased_keeps_the_suppression(ledger: Ledger) -> None:
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              email=EMAIL)  # fmt: skip
    carry_out(ledger, google_analytics=done_with())
    rights.advance(ledger, now=START)

    rights.cancel(ledger, request_id, "the person withdrew the request")

    tasks = {t.processor: t.state for t in ledger.tasks_for_request(request_id)}
    assert tasks == {"mailchimp": "cancelled", "google_analytics": "done"}
    assert ledger.is_suppressed(KEYS.email(EMAIL))
    assert ledger.suppression_size() == 3


def test_cancelling_after_a_person_confirmed_a_manual_erasure_keeps_the_suppression(
    ledger: Ledger,
) -> None:
    request_id = file_request(ledger, FakePhorest(record("c1")), FakeMailchimp(member()),
                              email=EMAIL)  # fmt: skip
    rights.confirm(ledger, make_settings(PAPER), request_id, PAPER_FORMS, by="Ann Manager",
                   now=START)  # fmt: skip

    rights.cancel(ledger, request_id, "the person withdrew the request")

    # The forms are shredded: the person must not be marketed to half-erased.
    assert ledger.suppression_size() == 3


def test_cancel_needs_an_open_request_and_a_reason(ledger: Ledger, erasure: int) -> None:
    with pytest.raises(RequestError, match="--reason must say why"):
        rights.cancel(ledger, erasure, " ")
    rights.cancel(ledger, erasure, "duplicate")
    with pytest.raises(RequestError, match=f"request #{erasure} is already cancelled"):
        rights.cancel(ledger, erasure, "again")


# -- dates and summaries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "months", "expected"),
    [((2026, 1, 31), 1, (2026, 2, 28)),
     ((2028, 1, 31), 1, (2028, 2, 29)),
     ((2026, 1, 31), 2, (2026, 3, 31)),
     ((2026, 3, 31), 1, (2026, 4, 30)),
     ((2026, 12, 15), 1, (2027, 1, 15)),
     ((2026, 11, 30), 3, (2027, 2, 28)),
     ((2026, 2, 28), 1, (2026, 3, 28)),
     ((2026, 5, 10), 0, (2026, 5, 10)),
     ((2026, 1, 31), 13, (2027, 2, 28))],
    ids=["jan31-feb28", "leap-feb29", "jan31-mar31", "mar31-apr30", "into-next-year",
         "nov30-plus3", "feb28-mar28", "zero", "thirteen"],
)
def test_add_months_counts_calendar_months_and_clamps_to_the_months_end(
    moment: tuple[int, int, int], months: int, expected: tuple[int, int, int]
) -> None:
    start = datetime(*moment, 14, 5, tzinfo=UTC)
    assert rights.add_months(start, months) == datetime(*expected, 14, 5, tzinfo=UTC)


def test_processor_states_report_the_worst_step_of_each_processor(
    ledger: Ledger, erasure: int
) -> None:
    assert rights.processor_states(ledger.steps(erasure)) == {
        "mailchimp": "failed", "google_analytics": "waiting", "phorest": "waiting",
        PAPER_FORMS: "waiting"}  # fmt: skip
    assert rights.processor_states([]) == {}


@pytest.mark.parametrize(("after", "left"), [(timedelta(0), 28), (timedelta(days=27, hours=23), 0),
                                            (timedelta(days=28, seconds=1), -1)])  # fmt: skip
def test_days_left_counts_whole_days_and_goes_negative_once_overdue(
    ledger: Ledger, erasure: int, after: timedelta, left: int
) -> None:
    request = ledger.request(erasure)
    assert request is not None
    assert rights.days_left(request, START + after) == left
