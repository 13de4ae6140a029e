"""The engine's full read: both sides at once, indexed as a sequential read would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

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
    index = engine._Index(KEYS)
    engine._read(index, clients(), members(), lambda *call: progress.append(call))

    sequential = engine._Index(KEYS)
    for n in range(1000):
        sequential.add_client(_client(n))
    for n in range(300, 1300):
        sequential.add_member(_member(n))
    assert overlapped == [True]
    assert list(index.addresses) == list(sequential.addresses)
    assert index.addresses == sequential.addresses
    assert index.stats == sequential.stats == {
        "clients": 1000, "members": 1000, "unusable_addresses": 0}
    stages = [stage for stage, _done, _total in progress]
    assert stages == sorted(stages, key=("phorest", "mailchimp").index)  # clients first
    assert ("phorest", 1000, 1000) in progress and progress[-1] == ("mailchimp", 1000, 1000)


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
        engine._read(engine._Index(KEYS), sides["phorest"], sides["mailchimp"])
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
        engine._read(engine._Index(KEYS), endless("phorest"), endless("mailchimp"), progress)
    assert sorted(closed) == ["mailchimp", "phorest"]
    assert not [t for t in threading.enumerate() if t.name.startswith("syncd-read-")]
