"""The resync's scratch store: newest versions, key order, moves, and nothing left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.ledger import KEYS_PER_QUERY, Scratch


def _client(key: str, client_id: str, updated: float, version: int, record: bytes,
            live: bool = True) -> tuple[str, str, float, int, bool, bytes]:
    return (key, client_id, updated, version, live, record)


def test_a_client_id_keeps_its_newest_version_and_ties_keep_the_first() -> None:
    with Scratch() as scratch:
        scratch.add_clients([_client("k1", "c1", 1767312000.5, 1, b"jan2"),
                             _client("k1", "c1", 1767225600.0, 9, b"jan1-v9"),
                             _client("k1", "c1", 1767312000.5, 1, b"tie")])
        scratch.add_clients([_client("k1", "c1", 1767312000.5, 2, b"jan2-v2"),
                             _client("k1", "c2", 1767225600.0, 1, b"other")])
        assert scratch.at(["k1"]) == [("k1", [b"jan2-v2", b"other"], None)]


_ROWS = st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["c1", "c2"]),
                           st.integers(1, 3), st.integers(1, 3), st.binary(max_size=3)),
                 max_size=400)


@settings(max_examples=30, deadline=None)
@given(_ROWS, st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from("uvwxyz")),
                       max_size=600))
def test_rows_written_together_store_what_one_at_a_time_would(
        rows: list[tuple[str, str, int, int, bytes]], pairs: list[tuple[str, str]]) -> None:
    # Many rows go to SQLite in one statement (up to its parameter limit, then
    # the next): the order rows are applied in must not change.
    clients = [_client(k, c, float(u), v, r) for k, c, u, v, r in rows]
    members = [(k, "subscribed", r) for k, _, _, _, r in rows]
    with Scratch() as together, Scratch() as one_by_one:
        together.add_clients(clients)
        together.add_members(members)
        together.claim(pairs)
        for client, member in zip(clients, members):
            one_by_one.add_clients([client])
            one_by_one.add_members([member])
        for pair in pairs:
            one_by_one.claim([pair])
        assert together.at(list("abcd")) == one_by_one.at(list("abcd"))
        assert together.moves(list("uvwxyz")) == one_by_one.moves(list("uvwxyz"))


def test_addresses_come_in_key_order_in_batches_with_their_member() -> None:
    with Scratch() as scratch:
        keys = [f"k{n:04d}" for n in range(1200)]
        scratch.add_clients(_client(k, "c", 1.0, 1, k.encode()) for k in keys[::2])
        scratch.add_members((k, "subscribed", b"m" + k.encode()) for k in reversed(keys[::3]))
        scratch.add_members([("k0000", "unsubscribed", b"later")])  # a later member wins
        batches = list(scratch.addresses(size=100))
        assert [len(b) for b in batches[:-1]] == [100] * (len(batches) - 1)
        flat = [row for batch in batches for row in batch]
        held = sorted(set(keys[::2]) | set(keys[::3]))
        assert [key for key, _, _ in flat] == held
        assert flat[0] == ("k0000", [b"k0000"], b"later")
        assert flat[1] == ("k0002", [b"k0002"], None)
        assert flat[2] == ("k0003", [], b"mk0003")
        # A batch is never larger than one query may name.
        assert max(len(b) for b in scratch.addresses(size=10 * KEYS_PER_QUERY)) <= KEYS_PER_QUERY


def test_memberless_addresses_unclaimed_members_and_live_clients() -> None:
    with Scratch() as scratch:
        scratch.add_clients([_client("a", "c1", 1.0, 1, b"a"), _client("b", "c2", 1.0, 1, b"b"),
                             _client("c", "c3", 1.0, 1, b"c", live=False)])
        scratch.add_members([("b", "subscribed", b"mb"), ("c", "absent", b"mc"),
                             ("d", "subscribed", b"md"), ("e", "absent", b"me")])
        memberless = [key for batch in scratch.addresses(memberless=True) for key, _, _ in batch]
        assert memberless == ["a", "c"]
        assert scratch.unclaimed_members(["a", "b", "c", "d", "e", "zz"]) == {"d"}
        assert scratch.live_among(["a", "b", "c", "d"]) == {"a", "b"}


def test_a_member_is_claimed_once_the_first_claim_wins() -> None:
    with Scratch() as scratch:
        scratch.claim([("old", "new1")])
        scratch.claim([("old", "new2"), ("old2", "new3")])
        assert scratch.moves(["new1", "new2", "new3", "x"]) == {"new1": "old", "new3": "old2"}
        assert scratch.claimed(["old", "old2", "new1"]) == {"old", "old2"}


def test_dead_clients_and_followups_page_in_order() -> None:
    with Scratch() as scratch:
        scratch.add_dead((f"d{n:04d}", b"x") for n in range(1100))
        scratch.add_dead([("d0005", b"later")])
        assert scratch.dead("d0005") == b"later" and scratch.dead("nobody") is None
        dead = [row for batch in scratch.dead_batches(size=300) for row in batch]
        assert [key for key, _ in dead] == [f"d{n:04d}" for n in range(1100)]
        scratch.add_followups([(3, b"c"), (1, b"a"), (2, b"b"), (3, b"c2")])
        assert [row for batch in scratch.followups(size=2) for row in batch] == [
            (1, b"a"), (2, b"b"), (3, b"c2")]


# Run in a process of its own: SQLite reads SQLITE_TMPDIR once, when it starts.
SPILL = """
import json, os, sys
from syncd.ledger import Scratch
from syncd.ledger._scratch import CACHE_KIB

def open_files():
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since it was listed
            continue
    return targets

record = sys.argv[1].encode() + os.urandom(1000)
with Scratch() as scratch:
    scratch.add_members(("%08d" % n, "subscribed", record) for n in range(2 * CACHE_KIB))
    during = open_files()
    listed = os.listdir(os.environ["SQLITE_TMPDIR"])
    found = len(scratch.at(["%08d" % 7]))
print(json.dumps({"during": during, "listed": listed, "found": found,
                  "after": os.listdir(os.environ["SQLITE_TMPDIR"])}))
"""


def test_a_store_that_outgrows_its_cache_spills_to_a_file_without_a_name(tmp_path: Path) -> None:
    """SQLite opens the spill file in its temporary directory and unlinks it at once."""
    spill = tmp_path / "tmp"
    spill.mkdir()
    marker = "person-0@example.com"
    done = subprocess.run([sys.executable, "-c", SPILL, marker], capture_output=True, text=True,
                          env={**os.environ, "SQLITE_TMPDIR": str(spill)}, timeout=120,
                          check=True)
    seen = json.loads(done.stdout)
    spilled = [target for target in seen["during"] if target.startswith(str(spill))]
    assert spilled, "the store never outgrew its cache: nothing was tested"
    assert all(target.endswith("(deleted)") for target in spilled)
    assert seen["listed"] == seen["after"] == [] and seen["found"] == 1
    assert list(spill.iterdir()) == []
