"""The engine's full read: both sides at once, stored as a sequential read would store them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.base import ClientRecord, MemberRecord
from syncd import engine
from syncd.errors import RetriableError
from syncd.identity import SubjectKeys

KEYS = SubjectKeys(b"k" * 32, "GB")
WHEN = datetime(2026, 11, 1, tzinfo=UTC)
# Long enough for a stuck read to show as a failed assertion, not a hung test.
WAIT_SECONDS = 10


def _client(n: int) -> ClientRecord:
    return ClientRecord(client_id=f"c{n}", email=f"person{n}@example.com", mobile=None,
                        first_name="A", last_name="B", email_consent=True, state="active",
                        version=1, updated_at=WHEN, created_at=WHEN, last_visit=None)


def _member(n: int) -> MemberRecord:
    return MemberRecord(email=f"Person{n}@example.com", status="subscribed", last_changed=WHEN)


def test_both_sides_are_read_at_once_and_indexed_as_a_sequential_read() -> None:
    members_started = threading.Event()
    overlapped: list[bool] = []

    def clients() -> Iterator[ClientRecord]:
        yield from (_client(n) for n in range(0, 500))
        # Phorest is still being read when Mailchimp starts: wait for it here.
        overlapped.append(members_started.wait(WAIT_SECONDS))
        yield from (_client(n) for n in range(500, 1000))

    def members() -> Iterator[MemberRecord]:
        members_started.set()
        yield from (_member(n) for n in range(300, 1300))

    progress: list[tuple[str, int, int | None]] = []
    with engine._Store(KEYS) as streamed, engine._Store(KEYS) as sequential:
        engine._read(streamed, clients(), members(), lambda *call: progress.append(call))
        sequential.add_clients(_client(n) for n in range(1000))
        sequential.add_members(_member(n) for n in range(300, 1300))
        assert overlapped == [True]
        assert _held(streamed) == _held(sequential)
        assert len(_held(streamed)) == 1300
        assert streamed.stats == sequential.stats == {
            "clients": 1000, "members": 1000, "unusable_addresses": 0}
    assert ("phorest", 1000, 1000) in progress and ("mailchimp", 1000, 1000) in progress
    for stage in ("phorest", "mailchimp"):
        done = [n for s, n, _total in progress if s == stage]
        assert done == sorted(done) and done[-1] == 1000


def _held(store: engine._Store) -> list[tuple[str, list[ClientRecord], MemberRecord | None]]:
    """Everything a store holds, address by address in key order, unpacked."""
    return [(key, sorted(map(engine._unpack_client, clients), key=lambda c: c.client_id),
             engine._unpack_member(member) if member else None)
            for batch in store.scratch.addresses() for key, clients, member in batch]


def test_a_store_keeps_the_newest_version_of_each_client_and_the_last_member() -> None:
    older = _client(1)
    newer = ClientRecord(**{**{f: getattr(older, f) for f in older.__slots__},
                            "version": 2, "first_name": "Newer", "updated_at": WHEN.replace(day=2)})
    same_time = ClientRecord(**{**{f: getattr(older, f) for f in older.__slots__},
                                "version": 1, "first_name": "Tie"})
    forgotten = ClientRecord(**{**{f: getattr(older, f) for f in older.__slots__},
                                "client_id": "gone", "email": None, "state": "forgotten"})
    with engine._Store(KEYS) as store:
        store.add_clients([newer, older, same_time, forgotten])
        store.add_members([_member(1), MemberRecord(email="PERSON1@example.com ",
                                                    status="unsubscribed", last_changed=WHEN)])
        store.add_clients([ClientRecord(**{**{f: getattr(older, f) for f in older.__slots__},
                                           "client_id": "bad", "email": "not an address"})])
        [(_key, clients, member)] = _held(store)
        assert clients == [newer]
        assert member is not None and member.status == "unsubscribed"
        assert store.dead_client(KEYS.client_id("gone")) == forgotten
        assert store.dead_client(KEYS.client_id("c1")) is None
        assert store.stats == {"clients": 5, "members": 2, "unusable_addresses": 1}


def test_records_come_back_from_the_store_field_for_field() -> None:
    client = ClientRecord(
        client_id="c9", email="Ann.Other@Example.com", mobile="+447700900123", first_name="Ann",
        last_name="O'Ther", email_consent=True, state="merged", version=7,
        updated_at=datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC), created_at=WHEN,
        last_visit=date(2025, 12, 24), merged_into="c1", raw='{"id": "c9"}',
        read_at=datetime(2026, 11, 2, tzinfo=UTC))
    member = MemberRecord(email="ann.other@example.com", status="cleaned", first_name="Ann",
                          last_name="Other", extra_fields=("PHONE", "BIRTHDAY"), last_changed=WHEN)
    back = engine._unpack_client(engine._pack_client(client))
    assert back == client and back.raw == client.raw and back.read_at == client.read_at
    assert engine._unpack_member(engine._pack_member(member)) == member
    bare = ClientRecord(client_id="c0", email=None, mobile=None, first_name="", last_name="",
                        email_consent=False, state="active", version=0, updated_at=WHEN)
    assert engine._unpack_client(engine._pack_client(bare)) == bare


@pytest.mark.parametrize("failing", ["phorest", "mailchimp"])
def test_a_side_that_fails_fails_the_read_and_stops_the_other(failing: str) -> None:
    other_closed = threading.Event()

    def broken() -> Iterator[object]:
        yield from (_client(n) for n in range(10))
        raise RetriableError("page could not be read")

    def endless(make: type) -> Iterator[object]:
        try:
            n = 0
            while True:
                n += 1
                yield _client(n) if make is ClientRecord else _member(n)
        finally:
            other_closed.set()

    sides = {"phorest": endless(ClientRecord), "mailchimp": endless(MemberRecord)}
    sides[failing] = broken()
    with pytest.raises(RetriableError):
        engine._read(engine._Store(KEYS), sides["phorest"], sides["mailchimp"])
    assert other_closed.wait(WAIT_SECONDS)
    assert not [t for t in threading.enumerate() if t.name.startswith("syncd-read-")]


def test_a_progress_callback_that_raises_stops_both_reads() -> None:
    closed: list[str] = []

    def endless(name: str) -> Iterator[object]:
        try:
            n = 0
            while True:
                n += 1
                yield _client(n) if name == "phorest" else _member(n)
        finally:
            closed.append(name)

    class Stop(Exception):
        pass

    def progress(stage: str, done: int, _total: int | None) -> None:
        if done >= 1000:
            raise Stop

    with pytest.raises(Stop):
        engine._read(engine._Store(KEYS), endless("phorest"), endless("mailchimp"), progress)
    assert sorted(closed) == ["mailchimp", "phorest"]
    assert not [t for t in threading.enumerate() if t.name.startswith("syncd-read-")]


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.just(UTC)),
       st.dates())
def test_instants_and_dates_survive_the_store_exactly(moment: datetime, day: date) -> None:
    client = ClientRecord(client_id="c1", email=None, mobile=None, first_name="", last_name="",
                          email_consent=False, state="active", version=1, updated_at=moment,
                          created_at=moment, last_visit=day, read_at=moment)
    back = engine._unpack_client(engine._pack_client(client))
    assert back == client
    assert back.updated_at.tzinfo is UTC and back.last_visit == day
    member = MemberRecord(email="a@example.com", status="subscribed", last_changed=moment)
    assert engine._unpack_member(engine._pack_member(member)).last_changed == moment
