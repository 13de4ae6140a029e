"""Fixtures for the emulator tests: a real server on 127.0.0.1 with a chosen set of emulators."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from syncd.sandbox.http import Emulator, SandboxServer, Traffic

Serve = Callable[..., SandboxServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start a SandboxServer on an ephemeral loopback port; stopped after the test."""
    servers: list[SandboxServer] = []

    def start(*emulators: Emulator, traffic: Traffic | None = None) -> SandboxServer:
        server = SandboxServer(("127.0.0.1", 0), emulators, traffic)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
