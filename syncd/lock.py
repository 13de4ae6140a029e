"""The ledger's writer lock: one engine mutates the ledger at a time.

The lock is an ``flock`` on ``<ledger>.lock``. The daemon holds it for as long
as it runs; a one-shot ``syncd resync`` holds it for its run. The kernel drops
an ``flock`` when its process ends, however it ends, so a crash never leaves a
stale lock behind. The file holds the holder's pid, for ``syncd status``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from syncd.errors import SyncdError


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
