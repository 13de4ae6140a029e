"""The explicit connector registry."""

from __future__ import annotations

import pytest

import connectors
from syncd.errors import ConfigError


def test_unknown_kind_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="unknown connector kind 'fax'"):
        connectors.load("fax")


def test_registered_kind_is_imported_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(connectors.REGISTRY, "demo", "syncd.errors:PermanentError")
    from syncd.errors import PermanentError

    assert connectors.load("demo") is PermanentError
