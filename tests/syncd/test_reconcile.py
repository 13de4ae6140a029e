"""Tests for syncd.reconcile: the rules as tables, then properties against a model of both sides."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import Action, ClientRecord, ClientState, MemberRecord, MemberStatus
from syncd.reconcile import (
    Housemate,
    LedgerFacts,
    Planned,
    SubjectView,
    govern,
    plan,
    plan_all,
    plan_analytics_erasure,
)

KEY = "a" * 64
EMAIL = "jane@example.com"
OLD_EMAIL = "old@example.com"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
# Later than every generated timestamp: the model's "now" when it applies a write.
MODEL_NOW = T0 + timedelta(days=30)


def at(days: int) -> datetime:
    return T0 + timedelta(days=days)


def client(**changes: Any) -> ClientRecord:
    base = ClientRecord(
        client_id="c1", email=EMAIL, mobile=None, first_name="Jane", last_name="Doe",
        email_consent=True, state="active", version=1, updated_at=T0,
    )
    return replace(base, **changes)


def member(**changes: Any) -> MemberRecord:
    base = MemberRecord(email=EMAIL, status="subscribed", first_name="Jane", last_name="Doe")
    return replace(base, **changes)


def unsubscribed(days: int) -> MemberRecord:
    """A member who unsubscribed in Mailchimp on day ``days``."""
    return member(status="unsubscribed", last_changed=at(days))


def view(c: ClientRecord | None = None, m: MemberRecord | None = None, **facts: Any) -> SubjectView:
    return SubjectView(KEY, c, m, LedgerFacts(**facts))


def key_of(client_id: str) -> str:
    return f"key-{client_id}"


def household(
    records: list[ClientRecord], m: MemberRecord | None = None, *,
    opted_in: dict[str, datetime] | None = None, **facts: Any,
) -> SubjectView:
    """The view the engine builds for an address several records share."""
    opted_in = opted_in or {}
    primary = govern(records).primary
    assert primary is not None
    mates = tuple(Housemate(key_of(r.client_id), r, opted_in.get(r.client_id))
                  for r in records if r is not primary)
    facts.setdefault("opted_in_at", opted_in.get(primary.client_id))
    return SubjectView(key_of(primary.client_id), primary, m, LedgerFacts(**facts), mates)


def summary(planned: list[Planned]) -> list[tuple[str, str, str, str]]:
    return [(p.processor, p.action.kind, p.rule, p.why) for p in planned]


# --- rules as tables -----------------------------------------------------------

ERASE = ("mailchimp", "erase")
UNSUBSCRIBE = ("mailchimp", "unsubscribe")
SUBSCRIBE = ("mailchimp", "subscribe")
WITHDRAW = ("phorest", "withdraw_consent")

CASES = [
    # 1. erasure beats everything
    pytest.param(view(client(), member(), suppressed=True),
                 [(*ERASE, "R3", "suppressed")], id="a suppressed subscribed member is erased"),
    pytest.param(view(client(), member(status="archived"), suppressed=True),
                 [(*ERASE, "R3", "suppressed")], id="a suppressed archived member is still erased"),
    pytest.param(view(None, member(status="unsubscribed"), suppressed=True),
                 [(*ERASE, "R3", "suppressed")], id="a suppressed orphan member is erased"),
    pytest.param(view(client(), None, suppressed=True), [],
                 id="a suppressed consenting client without a member is never re-added"),
    pytest.param(view(client(), member(status="absent"), suppressed=True), [],
                 id="a suppressed member already absent needs nothing"),
    pytest.param(view(client(), unsubscribed(1),
                      suppressed=True, restricted=True, opted_in_at=at(0)),
                 [(*ERASE, "R3", "suppressed")],
                 id="suppression beats restriction and a standing opt-out: erase and nothing else"),
    pytest.param(view(client(state="deleted"), member()),
                 [(*ERASE, "R5", "client_deleted")], id="a client deleted in phorest is erased"),
    pytest.param(view(client(state="forgotten", email=None), member(), synced_email=EMAIL),
                 [(*ERASE, "R5", "client_forgotten")],
                 id="a client forgotten in phorest is erased"),
    pytest.param(view(client(state="merged", merged_into="c2"), member()),
                 [(*ERASE, "R5", "client_merged")], id="a client merged away is erased"),
    pytest.param(household([client(state="merged", merged_into="c2"), client(client_id="c2")],
                           member()), [],
                 id="a merged away client sharing the survivor's address leaves the member to it"),
    pytest.param(household([client(state="deleted"), client(client_id="c2")], member(),
                           suppressed=True),
                 [(*ERASE, "R3", "suppressed")], id="suppression erases even a shared address"),
    pytest.param(view(client(state="deleted"), None), [],
                 id="a deleted client without a member needs nothing"),
    # 2. restriction
    pytest.param(view(client(), member(), restricted=True),
                 [(*UNSUBSCRIBE, "R1", "restricted")],
                 id="a restricted subscriber is unsubscribed"),
    pytest.param(view(client(), member(status="pending"), restricted=True),
                 [(*UNSUBSCRIBE, "R1", "restricted")],
                 id="a restricted pending member is unsubscribed"),
    pytest.param(view(client(), None, restricted=True), [],
                 id="a restricted consenting client is never subscribed"),
    pytest.param(view(client(), member(status="unsubscribed"), restricted=True), [],
                 id="a restricted client's phorest consent is left alone despite an opt-out"),
    pytest.param(view(client(first_name="Janet"), member(extra_fields=("PHONE",)), restricted=True),
                 [(*UNSUBSCRIBE, "R1", "restricted")],
                 id="a restricted member is not rectified, only unsubscribed"),
    # 3. opt-out in mailchimp against consent in phorest
    pytest.param(view(client(), unsubscribed(2)),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="a mailchimp unsubscribe withdraws phorest consent"),
    pytest.param(view(client(), member(status="cleaned", last_changed=at(2))),
                 [(*WITHDRAW, "R2", "cleaned_in_mailchimp")],
                 id="a cleaned member withdraws phorest consent"),
    pytest.param(view(client(), unsubscribed(2), opted_in_at=at(1)),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="an opt-in older than the opt-out does not win"),
    pytest.param(view(client(), unsubscribed(2), opted_in_at=at(2)),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="an opt-in at the same instant as the opt-out does not win"),
    pytest.param(view(client(), member(status="unsubscribed"), opted_in_at=at(9)),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="an opt-out of unknown time beats any opt-in"),
    pytest.param(view(client(), unsubscribed(1),
                      opted_out_at=at(3), opted_in_at=at(2)),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="the newest known opt-out time counts"),
    pytest.param(view(client(), unsubscribed(1), opted_in_at=at(2)),
                 [(*SUBSCRIBE, "R1", "opted_in_in_phorest_after_opt_out")],
                 id="a phorest opt-in newer than the unsubscribe is tried once"),
    pytest.param(view(client(), member(status="cleaned", last_changed=at(1)), opted_in_at=at(2)),
                 [(*SUBSCRIBE, "R1", "opted_in_in_phorest_after_opt_out")],
                 id="a phorest opt-in newer than a bounce is tried once"),
    pytest.param(view(client(), member(status="unsubscribed", last_changed=at(1),
                                     extra_fields=("PHONE",)), opted_in_at=at(2)),
                 [(*SUBSCRIBE, "R1", "opted_in_in_phorest_after_opt_out")],
                 id="a re-subscription leaves an opted-out member's fields until it succeeds"),
    pytest.param(view(client(), unsubscribed(1), opted_in_at=at(2),
                      resubscribe_refused=True), [],
                 id="a refused re-subscription waits for the person"),
    pytest.param(view(client(), None, opted_out_at=at(3), opted_in_at=at(2)),
                 [(*WITHDRAW, "R2", "opt_out_on_record")],
                 id="an opt-out on record withdraws consent even when the member is gone"),
    pytest.param(view(client(), member(status="archived"), opted_out_at=at(3)),
                 [(*WITHDRAW, "R2", "opt_out_on_record")],
                 id="an opt-out on record withdraws consent for an archived member"),
    pytest.param(view(client(), member(last_changed=at(1)), opted_out_at=at(3)),
                 [(*WITHDRAW, "R2", "opt_out_on_record"),
                  (*UNSUBSCRIBE, "R2", "opt_out_on_record")],
                 id="an opt-out on record beats a subscriber without a newer phorest opt-in"),
    pytest.param(view(client(), member(), opted_out_at=at(1), opted_in_at=at(2)), [],
                 id="a subscriber who opted back in in phorest is left alone"),
    pytest.param(view(client(), None, opted_out_at=at(1), opted_in_at=at(2)),
                 [(*SUBSCRIBE, "R1", "opted_in_in_phorest_after_opt_out")],
                 id="an opt-in newer than the recorded opt-out subscribes an absent member"),
    # 4. no consent in phorest
    pytest.param(view(client(email_consent=False), member()),
                 [(*UNSUBSCRIBE, "R1", "no_consent_in_phorest")],
                 id="no consent in phorest unsubscribes a subscriber"),
    pytest.param(view(client(email_consent=False), member(status="pending")),
                 [(*UNSUBSCRIBE, "R1", "no_consent_in_phorest")],
                 id="no consent in phorest unsubscribes a pending member"),
    pytest.param(view(client(email_consent=False, first_name="Janet"), member(extra_fields=("X",))),
                 [(*UNSUBSCRIBE, "R1", "no_consent_in_phorest")],
                 id="a member being unsubscribed is not rectified"),
    *[
        pytest.param(view(client(email_consent=False), m), [], id=f"no consent leaves {name} alone")
        for name, m in [
            ("an unsubscribed member", member(status="unsubscribed")),
            ("a cleaned member", member(status="cleaned")),
            ("a transactional member", member(status="transactional")),
            ("an archived member", member(status="archived")),
            ("an absent member", member(status="absent")),
            ("no member", None),
        ]
    ],
    # 5. consent in phorest
    *[
        pytest.param(view(client(), m), [(*SUBSCRIBE, "R1", "consent_in_phorest")],
                     id=f"consent in phorest subscribes {name}")
        for name, m in [
            ("a client with no member", None),
            ("an absent member", member(status="absent")),
            ("an archived member", member(status="archived")),
            ("a transactional member", member(status="transactional")),
            ("a pending member, never leaving it pending", member(status="pending")),
        ]
    ],
    pytest.param(view(client(), member(status="pending", extra_fields=("PHONE",))),
                 [(*SUBSCRIBE, "R1", "consent_in_phorest"),
                  ("mailchimp", "clear_extra_fields", "R1", "extra_merge_fields")],
                 id="subscribing a member with extra fields also clears them"),
    pytest.param(view(client(), None, resubscribe_refused=True), [],
                 id="a recorded refusal blocks every subscribe until the caller clears it"),
    pytest.param(view(client(), member()), [], id="a consenting subscriber in line needs nothing"),
    pytest.param(view(client(), member(email=" JANE@Example.COM")), [],
                 id="addresses compare trimmed and case-insensitively"),
    # archived clients: kept, never recruited
    pytest.param(view(client(state="archived"), None), [],
                 id="an archived consenting client is not recruited"),
    pytest.param(view(client(state="archived"), member(status="pending")), [],
                 id="an archived consenting client's pending member is not confirmed"),
    pytest.param(view(client(state="archived"), member()), [],
                 id="an archived consenting client's subscription is kept"),
    pytest.param(view(client(state="archived", email_consent=False), member()),
                 [(*UNSUBSCRIBE, "R1", "no_consent_in_phorest")],
                 id="an archived client without consent is unsubscribed"),
    pytest.param(view(client(state="archived"), member(status="unsubscribed")),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="an archived client's consent is withdrawn after a mailchimp opt-out"),
    pytest.param(view(client(state="archived", last_name="Smith"), member()),
                 [("mailchimp", "update_names", "R6", "name_changed_in_phorest")],
                 id="an archived client's subscribed member is still rectified"),
    # 6. rectification
    pytest.param(view(client(last_name="Smith"), member()),
                 [("mailchimp", "update_names", "R6", "name_changed_in_phorest")],
                 id="a name change in phorest updates the member"),
    pytest.param(view(client(first_name=" Jane "), member()), [],
                 id="surrounding whitespace in a name is not a change"),
    pytest.param(view(client(), member(extra_fields=("PHONE", "BIRTHDAY"))),
                 [("mailchimp", "clear_extra_fields", "R1", "extra_merge_fields")],
                 id="extra merge fields are cleared"),
    pytest.param(view(client(first_name="Janet"), member(extra_fields=("PHONE",))),
                 [("mailchimp", "update_names", "R6", "name_changed_in_phorest"),
                  ("mailchimp", "clear_extra_fields", "R1", "extra_merge_fields")],
                 id="names and extra fields are fixed together"),
    # 7. email change
    pytest.param(view(client(), member(email=OLD_EMAIL), synced_email=OLD_EMAIL),
                 [("mailchimp", "move_email", "R6", "email_changed_in_phorest")],
                 id="an email change moves the member instead of subscribing the new address"),
    pytest.param(view(client(last_name="Smith"), member(email=OLD_EMAIL), synced_email=OLD_EMAIL),
                 [("mailchimp", "move_email", "R6", "email_changed_in_phorest"),
                  ("mailchimp", "update_names", "R6", "name_changed_in_phorest")],
                 id="an email and a name change move then rename"),
    pytest.param(view(client(), member(email=OLD_EMAIL, status="pending"), synced_email=OLD_EMAIL),
                 [("mailchimp", "move_email", "R6", "email_changed_in_phorest"),
                  (*SUBSCRIBE, "R1", "consent_in_phorest")],
                 id="a pending member at the old address is moved then subscribed"),
    pytest.param(view(client(email_consent=False), member(email=OLD_EMAIL), synced_email=OLD_EMAIL),
                 [(*UNSUBSCRIBE, "R1", "no_consent_in_phorest")],
                 id="a member losing consent is unsubscribed where it is, not moved"),
    pytest.param(view(client(), member(email=OLD_EMAIL, status="unsubscribed"),
                      synced_email=OLD_EMAIL),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="an opted-out member at the old address is not moved and its opt-out wins"),
    pytest.param(view(client(), member(email=OLD_EMAIL, status="unsubscribed", last_changed=at(1)),
                      synced_email=OLD_EMAIL, opted_in_at=at(2)),
                 [(*SUBSCRIBE, "R1", "opted_in_in_phorest_after_opt_out")],
                 id="a newer opt-in with a new address subscribes the new address"),
    pytest.param(view(client(), member(email=OLD_EMAIL, status="archived"), synced_email=OLD_EMAIL),
                 [(*SUBSCRIBE, "R1", "consent_in_phorest")],
                 id="an archived member at the old address is not moved"),
    # 8. orphans
    pytest.param(view(None, member()), [(*UNSUBSCRIBE, "R1", "no_client_in_phorest")],
                 id="a subscriber with no phorest client is unsubscribed"),
    pytest.param(view(None, member(status="pending")),
                 [(*UNSUBSCRIBE, "R1", "no_client_in_phorest")],
                 id="a pending member with no phorest client is unsubscribed"),
    pytest.param(view(None, member(status="unsubscribed")), [],
                 id="an unsubscribed member with no phorest client is left alone"),
    pytest.param(view(None, None), [], id="nobody on either side needs nothing"),
    # 9. no email in phorest
    pytest.param(view(client(email=None), None), [],
                 id="a consenting client without an email is not subscribed"),
    pytest.param(view(client(email=None), member(email=OLD_EMAIL), synced_email=OLD_EMAIL), [],
                 id="a consenting client without an email keeps the member at the old address"),
    pytest.param(view(client(email=None, email_consent=False), member(email=OLD_EMAIL),
                      synced_email=OLD_EMAIL),
                 [(*UNSUBSCRIBE, "R1", "no_consent_in_phorest")],
                 id="a client without an email or consent is unsubscribed at the old address"),
    pytest.param(view(client(email=None), member(email=OLD_EMAIL, status="unsubscribed"),
                      synced_email=OLD_EMAIL),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="a client without an email still has consent withdrawn after an opt-out"),
]


@pytest.mark.parametrize(("subject", "expected"), CASES)
def test_plan_follows_the_rules_in_order_of_precedence(
    subject: SubjectView, expected: list[tuple[str, str, str, str]]
) -> None:
    assert summary(plan(subject)) == expected


def test_subscribe_carries_the_phorest_address_names_and_ids() -> None:
    [planned] = plan(view(client(email=" Jane@Example.com ", first_name=" Jane"), None))
    assert planned.action == Action(
        "subscribe", KEY, email="Jane@Example.com", client_id="c1",
        first_name="Jane", last_name="Doe",
    )


def test_actions_after_a_move_address_the_new_email() -> None:
    subject = view(client(first_name="Janet"), member(email=OLD_EMAIL, extra_fields=("PHONE",)),
                   synced_email=OLD_EMAIL)
    move, rename, clear = (p.action for p in plan(subject))
    assert (move.email, move.new_email) == (OLD_EMAIL, EMAIL)
    assert (rename.email, rename.first_name, rename.last_name) == (EMAIL, "Janet", "Doe")
    assert (clear.email, clear.fields) == (EMAIL, ("PHONE",))


def test_erase_and_unsubscribe_address_the_member_as_mailchimp_holds_it() -> None:
    [erase] = plan(view(client(state="deleted"), member(email="JANE@example.com")))
    [unsub] = plan(view(None, member(email="Orphan@Example.com")))
    assert (erase.action.email, erase.action.client_id) == ("JANE@example.com", "c1")
    assert (unsub.action.email, unsub.action.client_id) == ("Orphan@Example.com", None)


def test_withdraw_consent_carries_the_client_id_and_no_address() -> None:
    [withdraw] = plan(view(client(), member(status="unsubscribed")))
    assert withdraw.action == Action("withdraw_consent", KEY, client_id="c1")


def test_withdraw_consent_carries_the_record_as_read_for_a_one_call_write() -> None:
    raw = '{"clientId":"c1","version":1,"emailMarketingConsent":true}'
    read = client(raw=raw, read_at=at(2))
    [withdraw] = plan(view(read, member(status="unsubscribed")))
    assert (withdraw.action.record, withdraw.action.read_at) == (raw, at(2).isoformat())


def test_a_member_at_a_foreign_address_is_refused_without_naming_it() -> None:
    with pytest.raises(ValueError, match="neither") as raised:
        view(client(), member(email="someone.else@example.com"), synced_email=OLD_EMAIL)
    assert "@" not in str(raised.value)


def test_plan_all_streams_every_subject_in_turn() -> None:
    subjects = [view(None, member()), view(client(), None), view(client(), member())]
    assert [p.action.kind for p in plan_all(iter(subjects))] == ["unsubscribe", "subscribe"]


# --- Google Analytics: one deletion per dead client (R5) --------------------------------

GA_ERASE = ("google_analytics", "erase", "R5")

ANALYTICS_CASES = [
    pytest.param(client(), "user_id", False, EMAIL, False, None, id="an active client is kept"),
    pytest.param(client(state="archived"), "user_id", False, EMAIL, False, None,
                 id="an archived client is kept"),
    pytest.param(client(state="deleted"), "user_id", False, EMAIL, False,
                 (*GA_ERASE, "client_deleted"), id="a deleted client is erased by user id"),
    pytest.param(client(state="merged", merged_into="c9"), "client_id", False, EMAIL, False,
                 (*GA_ERASE, "client_merged"), id="a merged-away client is erased by client id"),
    pytest.param(client(state="forgotten", email=None), "user_id", False, None, False,
                 (*GA_ERASE, "client_forgotten"),
                 id="a forgotten client without an address is still erased by user id"),
    pytest.param(client(state="deleted"), "user_id", True, EMAIL, False, None,
                 id="a client GA was asked to delete before is not asked again"),
    pytest.param(client(state="deleted"), "user_id", False, EMAIL, True,
                 (*GA_ERASE, "client_deleted"),
                 id="by user id a shared address does not matter"),
    pytest.param(client(state="deleted"), "email", False, EMAIL, False,
                 (*GA_ERASE, "client_deleted"), id="by email a dead client's own address is erased"),
    pytest.param(client(state="forgotten", email=None), "email", False, None, False, None,
                 id="by email a forgotten client cannot be named"),
    pytest.param(client(state="deleted"), "email", False, EMAIL, True, None,
                 id="by email an address a live client uses is kept"),
    pytest.param(client(state="deleted"), "email", True, EMAIL, False, None,
                 id="by email an address erased before is not asked again"),
]


@pytest.mark.parametrize(("record", "identity", "erased_before", "email", "shared", "expected"),
                         ANALYTICS_CASES)  # fmt: skip
def test_plan_analytics_erasure(
    record: ClientRecord, identity: str, erased_before: bool, email: str | None, shared: bool,
    expected: tuple[str, str, str, str] | None,
) -> None:
    planned = plan_analytics_erasure(KEY, record, identity=identity, erased_before=erased_before,
                                     email=email, shared=shared)  # fmt: skip
    assert (None if planned is None else summary([planned])[0]) == expected
    if planned is not None:
        assert planned.action == Action("erase", KEY, email=email, client_id="c1")


# --- a model of both systems -------------------------------------------------------


def apply_to_model(subject: SubjectView, planned: list[Planned]) -> SubjectView:
    """What Phorest, Mailchimp and the caller's ledger look like after the actions succeed.

    Mailchimp refuses ``subscribe`` on a member in compliance state at the same
    address; the caller then records ``resubscribe_refused``. Every write to a
    member moves its ``last_changed`` to :data:`MODEL_NOW`, as Mailchimp does.
    """
    c, m, facts = subject.client, subject.member, subject.facts
    for p in planned:
        a = p.action
        if p.processor == "phorest":
            assert a.kind == "withdraw_consent" and c is not None and a.client_id == c.client_id
            c = replace(c, email_consent=False, updated_at=MODEL_NOW)
            continue
        assert a.email is not None
        here = m if m is not None and m.status != "absent" and _same(m.email, a.email) else None
        if a.kind == "subscribe":
            if here is not None and here.status in ("unsubscribed", "cleaned"):
                facts = replace(facts, resubscribe_refused=True)
                continue
            extra = here.extra_fields if here is not None else ()
            m = MemberRecord(a.email, "subscribed", a.first_name, a.last_name, extra, MODEL_NOW)
            facts = replace(facts, synced_email=a.email)
            continue
        # Every other action addresses an existing member, at the address it holds.
        assert here is not None, f"{a.kind} addresses no member"
        if a.kind == "erase":
            m = None
        elif a.kind == "unsubscribe":
            m = replace(here, status="unsubscribed", last_changed=MODEL_NOW)
        elif a.kind == "update_names":
            m = replace(here, first_name=a.first_name, last_name=a.last_name)
            m = replace(m, last_changed=MODEL_NOW)
        elif a.kind == "clear_extra_fields":
            assert a.fields == here.extra_fields
            m = replace(here, extra_fields=(), last_changed=MODEL_NOW)
        elif a.kind == "move_email":
            assert a.new_email is not None
            m = replace(here, email=a.new_email, last_changed=MODEL_NOW)
            facts = replace(facts, synced_email=a.new_email)
        else:  # pragma: no cover - every kind is handled above
            raise AssertionError(a.kind)
    if any(p.action.kind == "subscribe" for p in planned) and m is not None \
            and m.status == "subscribed":
        facts = replace(facts, unsubscribed_by_syncd=False)
    if any(p.action.kind == "unsubscribe" for p in planned):
        facts = replace(facts, unsubscribed_by_syncd=True)  # what the task runner records
    return SubjectView(subject.subject_key, c, m, facts, subject.housemates)


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


# Few distinct values, so that ties, matches and every branch turn up often.
times = st.sampled_from([None, None, at(1), at(2), at(3)])
# None is one address in five: clients without an email, subjects never synced.
addresses = st.sampled_from([EMAIL, " Jane@Example.COM", OLD_EMAIL, "new@example.com", None])
names = st.sampled_from(["Jane", " Jane", "Janet", ""])
rarely = st.integers(0, 7).map(lambda n: n == 0)  # True one time in eight
often = st.integers(0, 2).map(lambda n: n > 0)  # True two times in three
# Half the members are plain subscribers, the state most rules start from.
statuses = st.sampled_from(["subscribed"] * 7 + list(get_args(MemberStatus)))
# Mostly live clients: the erased states all take the same, short road.
client_states = st.sampled_from(["active"] * 5 + ["archived"] * 2 + list(get_args(ClientState)))


@st.composite
def subject_views(draw: st.DrawFn) -> SubjectView:
    c = None if draw(rarely) else draw(st.builds(
        ClientRecord,
        client_id=st.just("c1"), email=addresses, mobile=st.none(),
        first_name=names, last_name=st.sampled_from(["Doe", "Smith"]),
        email_consent=often, state=client_states,
        version=st.just(1), updated_at=st.just(T0),
    ))
    facts = draw(st.builds(
        LedgerFacts,
        suppressed=rarely, restricted=rarely, opted_out_at=times, opted_in_at=times,
        synced_email=addresses, resubscribe_refused=rarely,
    ))
    # A live client's member is at its address or the synced one (SubjectView's contract).
    live = c is not None and c.state in ("active", "archived")
    allowed = [e for e in (c.email, facts.synced_email) if e] if live and c else [EMAIL, OLD_EMAIL]
    m = None
    if allowed and draw(st.integers(0, 4)) > 0:
        m = draw(st.builds(
            MemberRecord,
            email=st.sampled_from(allowed), status=statuses,
            first_name=names, last_name=st.sampled_from(["Doe", "Smith"]),
            extra_fields=st.sampled_from([(), ("PHONE",), ("BIRTHDAY", "PHONE")]),
            last_changed=times,
        ))
    return SubjectView(KEY, c, m, facts)


@st.composite
def re_consented_views(draw: st.DrawFn) -> SubjectView:
    """A consenting active client who opted out in Mailchimp, then back in in Phorest."""
    subject = draw(subject_views())
    c = replace(subject.client or client(), state="active", email_consent=True)
    c = replace(c, email=c.email or EMAIL)
    facts = replace(
        subject.facts, suppressed=False, restricted=False,
        opted_out_at=draw(st.sampled_from([None, at(1), at(2)])), opted_in_at=at(3),
    )
    m = draw(st.builds(
        MemberRecord,
        email=st.sampled_from([e for e in (c.email, facts.synced_email) if e]),
        status=st.sampled_from(["unsubscribed", "cleaned"]), first_name=names,
        last_name=st.sampled_from(["Doe", "Smith"]),
        extra_fields=st.sampled_from([(), ("PHONE",)]), last_changed=st.just(at(1)),
    ))
    return SubjectView(KEY, c, m, facts)


def opt_out_stands(subject: SubjectView) -> bool:
    """An opt-out seen on either side and no strictly newer Phorest opt-in (the model's view)."""
    m, facts = subject.member, subject.facts
    in_mailchimp = m is not None and m.status in ("unsubscribed", "cleaned")
    if not in_mailchimp and facts.opted_out_at is None:
        return False
    known = [t for t in (facts.opted_out_at, m.last_changed if in_mailchimp and m else None) if t]
    return not (known and facts.opted_in_at is not None and facts.opted_in_at > max(known))


def marketed(subject: SubjectView) -> bool:
    return subject.member is not None and subject.member.status in ("subscribed", "pending")


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(subject_views())
def test_nobody_without_standing_consent_is_ever_subscribed(subject: SubjectView) -> None:
    c, facts = subject.client, subject.facts
    without_consent = (
        c is None or not c.email_consent or c.state != "active" or not c.email
        or facts.suppressed or facts.restricted or opt_out_stands(subject)
    )
    if without_consent:
        assert "subscribe" not in [p.action.kind for p in plan(subject)]


@PROPERTY_SETTINGS
@given(subject_views())
def test_an_opt_out_on_either_side_ends_with_both_sides_opted_out(subject: SubjectView) -> None:
    c, facts = subject.client, subject.facts
    if facts.suppressed:
        return  # erasure
    opted_out = opt_out_stands(subject) or (c is not None and not c.email_consent)
    if not opted_out:
        return
    after = apply_to_model(subject, plan(subject))
    assert not marketed(after)
    live = after.client is not None and after.client.state in ("active", "archived")
    if live and not facts.restricted:  # a restriction leaves Phorest alone (R7)
        assert after.client is not None and after.client.email_consent is False


@PROPERTY_SETTINGS
@given(subject_views())
def test_planning_again_after_the_plan_is_applied_changes_nothing(subject: SubjectView) -> None:
    after = apply_to_model(subject, plan(subject))
    assert plan(after) == []


@PROPERTY_SETTINGS
@given(re_consented_views())
def test_a_newer_phorest_opt_in_is_tried_once_and_never_rewrites_the_opt_out(
    subject: SubjectView,
) -> None:
    planned = plan(subject)
    after = apply_to_model(subject, planned)
    assert [p.action.kind for p in planned] in (["subscribe"], [])
    assert after.client is not None and after.client.email_consent  # the opt-in was honoured
    if after.member is not None and after.member.status != "subscribed":
        # Refused, or waiting for a person: the opt-out's trace in Mailchimp is untouched.
        assert after.member == subject.member and after.facts.resubscribe_refused
    assert plan(after) == []


@PROPERTY_SETTINGS
@given(subject_views())
def test_a_suppressed_subject_only_ever_gets_one_erase(subject: SubjectView) -> None:
    subject = replace(subject, facts=replace(subject.facts, suppressed=True))
    planned = plan(subject)
    assert [p.action.kind for p in planned] in ([], ["erase"])
    assert all(p.rule == "R3" for p in planned)


@PROPERTY_SETTINGS
@given(subject_views())
def test_reasons_hold_no_personal_data_and_actions_only_known_addresses(
    subject: SubjectView,
) -> None:
    c, m = subject.client, subject.member
    known = {e.strip().lower() for e in (c and c.email, m and m.email) if e}
    for p in plan(subject):
        assert "@" not in p.why and p.why.isidentifier()
        for address in (p.action.email, p.action.new_email):
            assert address is None or address.strip().lower() in known


# --- shared addresses: who governs, as tables ------------------------------------------

ARCHIVED_NEWER = client(client_id="c2", state="archived", updated_at=at(9), created_at=at(-9))
SECOND = client(client_id="c2", first_name="John", created_at=at(-5))
THIRD = client(client_id="c3", first_name="Jim", created_at=at(-1))
FIRST = client(created_at=at(-20))

SHARED_CASES = [
    pytest.param(household([FIRST, replace(ARCHIVED_NEWER, email_consent=False)], None),
                 [(*SUBSCRIBE, "R1", "consent_in_phorest")],
                 id="an active consenting client is recruited though a newer archived record "
                    "at the address lacks consent"),
    pytest.param(household([replace(FIRST, email_consent=False), ARCHIVED_NEWER], member()),
                 [(*UNSUBSCRIBE, "R1", "no_consent_in_phorest")],
                 id="a newer archived record with consent never keeps marketing to an active "
                    "client who withdrew"),
    pytest.param(household([replace(FIRST, state="archived"),
                            replace(ARCHIVED_NEWER, email_consent=False)],
                           member()),
                 [(*UNSUBSCRIBE, "R1", "no_consent_from_another_client_at_address")],
                 id="archived records govern together when no active record uses the address"),
    pytest.param(household([FIRST, replace(SECOND, email_consent=False)], member()),
                 [(*UNSUBSCRIBE, "R1", "no_consent_from_another_client_at_address")],
                 id="one active record without consent unsubscribes the shared member and "
                    "withdraws nobody"),
    pytest.param(household([FIRST, SECOND], unsubscribed(2)),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp"),
                  (*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="a mailchimp opt-out withdraws consent on every active record at the address"),
    pytest.param(household([FIRST, SECOND, replace(ARCHIVED_NEWER, client_id="c3")], unsubscribed(2)),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")] * 3,
                 id="a mailchimp opt-out withdraws consent on archived records at the address too"),
    pytest.param(household([FIRST, replace(SECOND, email_consent=False)], unsubscribed(2),
                           unsubscribed_by_syncd=True), [],
                 id="syncd's own unsubscribe is nobody's opt-out: the consenting record keeps "
                    "its consent"),
    pytest.param(household([FIRST, SECOND], unsubscribed(2), opted_in={"c1": at(3)}),
                 [(*WITHDRAW, "R2", "unsubscribed_in_mailchimp")],
                 id="a record whose own opt-in is newer than the opt-out keeps its consent, "
                    "the other loses it"),
    pytest.param(household([FIRST, SECOND], unsubscribed(2),
                           opted_in={"c1": at(3), "c2": at(4)}),
                 [(*SUBSCRIBE, "R1", "opted_in_in_phorest_after_opt_out")],
                 id="every governing record opted in after the opt-out: one re-subscribe"),
    pytest.param(household([SECOND, FIRST, THIRD], member(first_name="John")),
                 [("mailchimp", "update_names", "R6", "name_changed_in_phorest")],
                 id="names come from the record created first, whatever the reading order"),
    pytest.param(household([THIRD, FIRST, SECOND], member()), [],
                 id="a family of three who all consent keep their subscribed member"),
    pytest.param(household([FIRST, client(client_id="c2", state="deleted")], member()), [],
                 id="a deleted record does not erase a member an active record governs"),
    pytest.param(household([client(state="deleted"), client(client_id="c2", state="merged")],
                           member()),
                 [(*ERASE, "R5", "client_deleted")],
                 id="dead records govern only when no live record uses the address"),
]


@pytest.mark.parametrize(("subject", "expected"), SHARED_CASES)
def test_shared_address_rule(subject: SubjectView, expected: list[tuple[str, ...]]) -> None:
    assert summary(plan(subject)) == expected


def test_withdrawals_at_a_shared_address_carry_each_records_own_key_and_id() -> None:
    planned = plan(household([FIRST, SECOND], unsubscribed(2)))
    assert {(p.action.subject_key, p.action.client_id) for p in planned} == {
        (key_of("c1"), "c1"), (key_of("c2"), "c2")}


def test_a_view_whose_client_is_not_the_primary_record_is_refused() -> None:
    with pytest.raises(ValueError, match="primary"):
        SubjectView(KEY, SECOND, None, LedgerFacts(), (Housemate(key_of("c1"), FIRST),))


def test_governance_counts_a_client_id_once_in_its_newest_version() -> None:
    older, newer = replace(FIRST, email_consent=False), replace(FIRST, updated_at=at(5), version=2)
    governance = govern([older, newer, SECOND])
    assert governance.governing == (newer, SECOND) and governance.consent
    assert governance.describe() == ("active+active", "active")


# --- shared addresses: properties over households of 1-4 records ------------------------

HOUSEHOLD_IDS = ("c1", "c2", "c3", "c4")


@st.composite
def households(draw: st.DrawFn) -> tuple[list[ClientRecord], MemberRecord | None, LedgerFacts,
                                         dict[str, datetime]]:
    """Records sharing EMAIL in random states, consents and times; a member; ledger facts."""
    count = draw(st.integers(1, 4))
    records = [
        ClientRecord(
            client_id=client_id, email=draw(st.sampled_from([EMAIL, " JANE@example.com"])),
            mobile=None, first_name=draw(names), last_name=draw(st.sampled_from(["Doe", "Roe"])),
            email_consent=draw(often), state=draw(client_states), version=1,
            updated_at=draw(st.sampled_from([at(0), at(1), at(2), at(3)])),
            created_at=draw(st.sampled_from([None, at(-3), at(-2), at(-1)])),
        )
        for client_id in HOUSEHOLD_IDS[:count]
    ]
    m = None
    if draw(st.integers(0, 3)) > 0:
        m = draw(st.builds(
            MemberRecord, email=st.just(EMAIL), status=statuses, first_name=names,
            last_name=st.sampled_from(["Doe", "Roe"]), extra_fields=st.just(()),
            last_changed=times,
        ))
    facts = draw(st.builds(
        LedgerFacts, opted_out_at=times, resubscribe_refused=rarely,
        unsubscribed_by_syncd=rarely,
    ))
    opted_in = {r.client_id: t for r in records if (t := draw(times)) is not None}
    return records, m, facts, opted_in


def household_view(records: list[ClientRecord], m: MemberRecord | None, facts: LedgerFacts,
                   opted_in: dict[str, datetime]) -> SubjectView:
    primary = govern(records).primary
    assert primary is not None
    mates = tuple(Housemate(key_of(r.client_id), r, opted_in.get(r.client_id))
                  for r in records if r is not primary)
    return SubjectView(key_of(primary.client_id), primary, m,
                       replace(facts, opted_in_at=opted_in.get(primary.client_id)), mates)


def apply_household(subject: SubjectView, planned: list[Planned]) -> SubjectView:
    """Apply a plan to a household, as the vendors and the task runner would."""
    records = {r.client_id: r for r in (subject.client, *(h.client for h in subject.housemates))
               if r is not None}  # fmt: skip
    opted_in = {h.client.client_id: h.opted_in_at for h in subject.housemates if h.opted_in_at}
    assert subject.client is not None
    if subject.facts.opted_in_at:
        opted_in[subject.client.client_id] = subject.facts.opted_in_at
    withdrawn = [p for p in planned if p.processor == "phorest"]
    for p in withdrawn:
        assert p.action.kind == "withdraw_consent" and p.action.client_id in records
        assert p.action.subject_key == key_of(p.action.client_id)
        records[p.action.client_id] = replace(records[p.action.client_id], email_consent=False,
                                              updated_at=MODEL_NOW)
    mailchimp = [p for p in planned if p.processor == "mailchimp"]
    single = replace(subject, housemates=())
    after = apply_to_model(single, mailchimp)
    ordered = [records[client_id] for client_id in sorted(records)]
    return household_view(ordered, after.member, after.facts, opted_in)


def governing_consent(subject: SubjectView) -> bool:
    return subject.governance().consent


@PROPERTY_SETTINGS
@given(households())
def test_a_shared_member_is_never_subscribed_while_a_governing_record_lacks_consent(
    drawn: tuple[Any, ...],
) -> None:
    subject = household_view(*drawn)
    planned = plan(subject)
    after = apply_household(subject, planned)
    assert governing_consent(after) or not marketed(after)
    if "subscribe" in [p.action.kind for p in planned]:
        assert subject.governance().tier == "active" and governing_consent(subject)


@PROPERTY_SETTINGS
@given(households())
def test_a_shared_address_whose_governing_records_all_consent_is_subscribed(
    drawn: tuple[Any, ...],
) -> None:
    records, m, facts, opted_in = drawn
    facts = replace(facts, opted_out_at=None, resubscribe_refused=False)
    m = m if m is None or m.status not in ("unsubscribed", "cleaned") else None
    subject = household_view(records, m, facts, opted_in)
    governance = subject.governance()
    if not (governance.consent and governance.tier == "active"):
        return
    after = apply_household(subject, plan(subject))
    if m is not None and m.status == "archived":
        return  # an archived member is re-subscribed like an absent one
    assert after.member is not None and after.member.status == "subscribed"
    primary = governance.primary
    assert primary is not None
    assert (after.member.first_name.strip(), after.member.last_name.strip()) == (
        primary.first_name.strip(), primary.last_name.strip())


@PROPERTY_SETTINGS
@given(households())
def test_planning_a_household_again_after_applying_changes_nothing(drawn: tuple[Any, ...]) -> None:
    subject = household_view(*drawn)
    after = apply_household(subject, plan(subject))
    assert plan(after) == []


@PROPERTY_SETTINGS
@given(households(), st.randoms(use_true_random=False))
def test_the_order_records_are_read_in_changes_nothing(
    drawn: tuple[Any, ...], rnd: Any,
) -> None:
    records, m, facts, opted_in = drawn
    shuffled = list(records)
    rnd.shuffle(shuffled)
    first, second = household_view(records, m, facts, opted_in), household_view(
        shuffled, m, facts, opted_in)
    assert plan(first) == plan(second)
    assert first.client == second.client


@PROPERTY_SETTINGS
@given(households())
def test_consent_is_withdrawn_only_where_an_opt_out_stands(drawn: tuple[Any, ...]) -> None:
    subject = household_view(*drawn)
    withdrawn = [p for p in plan(subject) if p.processor == "phorest"]
    m, facts = subject.member, subject.facts
    own = facts.unsubscribed_by_syncd and m is not None and m.status == "unsubscribed"
    opted_out = facts.opted_out_at is not None or (
        m is not None and m.status in ("unsubscribed", "cleaned") and not own)
    if not opted_out or subject.governance().tier == "dead":
        assert withdrawn == []
    for p in withdrawn:
        assert p.why in ("unsubscribed_in_mailchimp", "cleaned_in_mailchimp", "opt_out_on_record")
