"""Fixtures for connector unit tests: HTTP faked at the wire with ``responses``."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest
import responses
import structlog
from responses.registries import OrderedRegistry

from syncd import log as syncd_log


@pytest.fixture
def wire() -> Iterator[responses.RequestsMock]:
    """Fake HTTP; registered responses need not all be used."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def script() -> Iterator[responses.RequestsMock]:
    """Responses served strictly in registration order (503, 503, 200 …)."""
    with responses.RequestsMock(registry=OrderedRegistry) as mock:
        yield mock


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """syncd.log configured at debug into a StringIO; logging restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    syncd_log.configure(level="debug", fmt="json", stream=stream)
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def pool_threads(prefix: str) -> list[str]:
    """The live threads whose names start with ``prefix`` (a scan's read-ahead pool)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.fixture
def no_pool_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test, no thread of the test module's ``POOL_PREFIX`` pool is left."""
    yield
    assert pool_threads(request.module.POOL_PREFIX) == []
