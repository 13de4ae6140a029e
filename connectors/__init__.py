"""Connectors: how to talk to one outside system each.

``REGISTRY`` maps a configuration section (a connector *kind*) to the dotted
path of its class, imported only when that section is configured. Connectors
never import the ledger, the daemon, the CLI or each other.
"""

from __future__ import annotations

import importlib
from typing import Any

from syncd.errors import ConfigError

# kind -> "module:Class". Filled in as each connector lands; explicit on purpose
# (no plugin discovery), so what can run is visible in one place.
REGISTRY: dict[str, str] = {
    "phorest": "connectors.phorest:PhorestConnector",
    "mailchimp": "connectors.mailchimp:MailchimpConnector",
    "google_analytics": "connectors.google_analytics:GoogleAnalyticsConnector",
}


def load(kind: str) -> Any:
    """The connector class registered for ``kind``.

    Raises:
        ConfigError: no connector is registered under that name.
    """
    try:
        dotted = REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise ConfigError(f"unknown connector kind {kind!r} (known: {known})") from None
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)
