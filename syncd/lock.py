"""The ledger's writer lock: one engine mutates the ledger at a time.

The lock is an ``flock`` on ``<ledger>.lock``. The daemon holds it for as long
as it runs; a one-shot ``syncd resync`` holds it for its run. The kernel drops
an ``flock`` when its process ends, however it ends, so a crash never leaves a
stale lock behind. The file holds the holder's pid, for ``syncd status``.

Whoever holds the lock owns all the work in the ledger. A holder that was
killed leaves tasks in flight, a resync it was running for ``syncd resync``
marked running, and scrubbed personal data in the WAL; nobody else would ever
finish them. :func:`writer_ledger` takes the lock and takes that over, and it
is the one way in for every engine (the daemon and the one-shot resync).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from syncd.errors import SyncdError
from syncd.ledger import Ledger

log = structlog.get_logger(__name__)

ABANDONED_COMMAND_REASON = "syncd stopped before this resync finished; ask again"


class AlreadyRunning(SyncdError):
    """Another syncd holds the ledger's writer lock."""


def lock_path(ledger_path: str | os.PathLike[str]) -> Path:
    """Where the writer lock of this ledger lives."""
    return Path(f"{ledger_path}.lock")


@contextmanager
def writer_lock(ledger_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive writer lock beside the ledger while inside.

    Raises:
        AlreadyRunning: another process holds it.
    """
    path = lock_path(ledger_path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another syncd is running on this ledger (lock {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def writer_ledger(ledger_path: str | os.PathLike[str]) -> Iterator[Ledger]:
    """Take the writer lock, open the ledger, and take over what a dead holder left.

    Every task still in flight goes back to pending, due now, whatever its age:
    the lock proves that no live process is working on it, so its holder died
    (a later ``enqueue`` of the same action would otherwise deduplicate onto a
    task nobody runs). A resync still marked running for a waiting ``syncd
    resync`` is failed, and the WAL is emptied of what the dead holder may have
    scrubbed without checkpointing.

    Yields:
        The open ledger, for the caller to write while it holds the lock.

    Raises:
        AlreadyRunning: another process holds the lock.
        LedgerError: the ledger cannot be opened or written.
    """
    with writer_lock(ledger_path), Ledger.open(ledger_path) as ledger:
        released = ledger.release_in_flight()
        if released:
            log.warning("tasks_released_after_restart", count=released)
        if ledger.fail_abandoned_commands(ABANDONED_COMMAND_REASON):
            log.warning("resync_request_abandoned")
        if not ledger.flush_scrubbed(always=True):
            log.info("wal_flush_deferred", reason="a reader holds an old snapshot")
        yield ledger


def lock_holder(ledger_path: str | os.PathLike[str]) -> int | None:
    """The pid holding the writer lock, or None when nobody does.

    Probes with a non-blocking shared lock, so it never takes the lock from a
    writer, and never creates the lock file.

    Raises:
        OSError: the lock file exists but cannot be opened (permissions).
    """
    path = lock_path(ledger_path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
