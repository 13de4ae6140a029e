"""Exports filed through the console: a private file, a manager's download, deleted on time."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from syncd import export
from syncd.console._pages import export_directory
from tests.syncd.console.conftest import MANAGER, RECEPTION, Console, clients_of

KEEP_MINUTES = 30


@pytest.fixture(scope="module")
def filed(console: Console) -> dict[str, Any]:
    console.set_console(export_keep_minutes=KEEP_MINUTES)
    person = clients_of(console.sandbox)[7]
    answer = console.file(console.reception(), "export", client_id=person["clientId"],
                          export_format="json")
    assert answer.status_code == 302, answer.text
    request_id = int(answer.headers["Location"].rsplit("/", 1)[1])
    directory = export_directory(console.settings, create=False)
    return {"person": person, "id": request_id, "directory": directory,
            "path": directory / f"syncd-export-{request_id}.json"}


def test_the_file_is_private_in_a_private_directory(filed: dict[str, Any]) -> None:
    path: Path = filed["path"]
    assert stat.S_IMODE(filed["directory"].stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in filed["directory"].iterdir()] == [path.name]
    assert filed["person"]["email"] in path.read_text()


def test_reception_sees_no_download_and_cannot_fetch_it(console: Console,
                                                        filed: dict[str, Any]) -> None:
    client = console.reception()
    page = client.get(f"/requests/{filed['id']}")
    assert "A manager can download this export" in page.text and 'id="download"' not in page.text
    answer = client.get(f"/requests/{filed['id']}/export")
    assert answer.status_code == 403
    assert filed["person"]["email"] not in answer.text
    assert not [e for e in console.audit("export_download") if e.request_id == filed["id"]]


def test_a_manager_downloads_it_as_an_attachment_and_it_is_audited(
    console: Console, filed: dict[str, Any]
) -> None:
    client = console.manager()
    assert 'id="download"' in client.get(f"/requests/{filed['id']}").text
    answer = client.get(f"/requests/{filed['id']}/export", buffered=False)
    assert answer.status_code == 200
    assert answer.is_streamed
    disposition = answer.headers["Content-Disposition"]
    assert disposition.startswith("attachment") and filed["path"].name in disposition
    assert answer.headers["Cache-Control"] == "no-store"
    body = b"".join(answer.response)
    answer.close()
    assert body == filed["path"].read_bytes()
    assert json.loads(body)
    (event,) = [e for e in console.audit("export_download") if e.request_id == filed["id"]]
    assert event.actor == MANAGER and event.outcome == "done"


def test_the_file_is_deleted_after_keep_minutes_audited_and_no_longer_served(
    console: Console, filed: dict[str, Any]
) -> None:
    path: Path = filed["path"]
    written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    with console.ledger() as ledger:
        early = export.delete_expired(ledger, filed["directory"], KEEP_MINUTES,
                                      written + timedelta(minutes=KEEP_MINUTES - 1))
        assert early == 0 and path.exists()
        late = export.delete_expired(ledger, filed["directory"], KEEP_MINUTES,
                                     written + timedelta(minutes=KEEP_MINUTES, seconds=1))
    assert late == 1 and not path.exists()
    (event,) = [e for e in console.audit("export_deleted") if e.request_id == filed["id"]]
    assert f"{KEEP_MINUTES} min" in (event.detail or "")
    answer = console.manager().get(f"/requests/{filed['id']}/export")
    assert answer.status_code == 404 and "File the export again" in answer.text
    assert 'id="download"' not in console.manager().get(f"/requests/{filed['id']}").text


def test_the_filing_is_audited_with_who_filed_it(console: Console, filed: dict[str, Any]) -> None:
    filings = [e for e in console.audit("request_export") if e.request_id == filed["id"]]
    assert filings and filings[0].actor == RECEPTION
