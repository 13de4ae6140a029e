"""Shared fixtures: every test starts from an environment with no syncd settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_syncd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own SYNCD_* variables or systemd credentials must not leak
    # into a test's idea of the configuration.
    for name in list(os.environ):
        if name.upper().startswith("SYNCD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
