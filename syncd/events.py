"""Events pushed to syncd, as the HTTP layer hands them on for processing.

:mod:`syncd.web` parses them from Mailchimp's webhooks and records them;
:mod:`syncd.inbox` processes what was recorded. Both import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class WebhookEvent:
    """One parsed Mailchimp audience event.

    ``payload`` holds what processing needs (addresses, reason, names) and is
    scrubbed from the ledger once processed.
    """

    kind: str
    occurred_at: datetime
    payload: dict[str, str]
    dedupe_key: str
