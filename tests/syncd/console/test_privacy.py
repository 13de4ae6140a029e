"""No client's address, number or name on any page of the console.

Requests are filed through the console for known sandbox clients (by email,
phone and client id); then every page is fetched as a manager and as
reception and searched for every sandbox client's email, phone (as stored and
as typed) and names. The one exception is the identifier a user typed,
re-shown in the form they are filling.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.support import seeded_values
from tests.syncd.console.conftest import Console, clients_of

Page = tuple[str, str]  # (what was fetched, the body)


def _phone_spellings(mobile: str) -> set[str]:
    national = mobile[2:] if mobile.startswith("44") else mobile
    return {mobile, f"+{mobile}", f"0{national}", national}


@pytest.fixture(scope="module")
def world(console: Console) -> dict[str, Any]:
    """Pages before anything was filed (to learn the console's own words), then the filings."""
    manager, reception = console.manager(), console.reception()
    vocabulary = " ".join(text for _, text in _pages(console, manager, []))
    chosen = clients_of(console.sandbox)[:5]
    everyone = console.sandbox.phorest.snapshot_clients()
    shared = Counter(c["email"] for c in everyone if c.get("email") and not (
        c.get("archived") or c.get("deleted") or c.get("mergedToClientId")))
    ambiguous = next(email for email, n in shared.items() if n >= 2)
    filings = [
        (manager, "erase", {"email": chosen[0]["email"]}),
        (reception, "restrict", {"phone": chosen[1]["mobile"]}),
        (manager, "export", {"client_id": chosen[2]["clientId"]}),
        (reception, "erase", {"client_id": chosen[3]["clientId"],
                              "note": "asked at the desk"}),
        (reception, "export", {"email": chosen[4]["email"], "export_format": "json"}),
        (manager, "erase", {"email": "never.a.client@example.net"}),
    ]
    answers: list[Page] = []
    ids = []
    for client, kind, identifiers in filings:
        answer = console.file(client, kind, **identifiers)
        assert answer.status_code == 302, answer.text
        ids.append(int(answer.headers["Location"].rsplit("/", 1)[1]))
        answers.append((f"filing {kind} {sorted(identifiers)}", answer.text))
        answers.append((f"after filing {kind}", client.get(answer.headers["Location"]).text))
    return {"chosen": chosen, "ambiguous": ambiguous, "ids": ids, "answers": answers,
            "everyone": everyone, "vocabulary": vocabulary}


def _pages(console: Console, client: FlaskClient, ids: list[int]) -> list[Page]:
    """Every GET page of the console (the export download aside: it is the person's data)."""
    urls = []
    for rule in console.app.url_map.iter_rules():
        if "GET" not in (rule.methods or ()) or rule.endpoint in ("static", "download_export"):
            continue
        if "<int:request_id>" in rule.rule:
            urls += [rule.rule.replace("<int:request_id>", str(i)) for i in ids]
        else:
            assert "<" not in rule.rule, f"a new route with arguments: {rule.rule}"
            urls.append(rule.rule)
    urls += ["/requests?all=1", "/requests?page=2", "/requests/424242", "/nowhere"]
    pages = []
    for url in urls:
        answer = client.get(url)
        assert answer.status_code in (200, 403, 404), (url, answer.status_code)
        pages.append((url, answer.text))
    return pages


def _forbidden(world: dict[str, Any], console: Console) -> dict[str, re.Pattern[str]]:
    """What must not appear: every address and number, and every name the console never says."""
    found: dict[str, re.Pattern[str]] = {}
    for value in seeded_values(console.sandbox):
        found[value] = re.compile(re.escape(value), re.IGNORECASE)
    for client in world["everyone"]:
        if client.get("mobile"):
            for spelling in _phone_spellings(client["mobile"]):
                found[spelling] = re.compile(re.escape(spelling))
        for name in (client.get("firstName"), client.get("lastName")):
            if name and not re.search(rf"\b{re.escape(name)}\b", world["vocabulary"]):
                found[name] = re.compile(rf"\b{re.escape(name)}\b")
    return found


def _leaks(pages: list[Page], forbidden: dict[str, re.Pattern[str]]) -> list[tuple[str, str]]:
    return [(where, value) for where, text in pages for value, pattern in forbidden.items()
            if pattern.search(text)]


def test_the_chosen_clients_are_real_sandbox_clients(world: dict[str, Any],
                                                     console: Console) -> None:
    forbidden = _forbidden(world, console)
    for client in world["chosen"]:
        assert client["email"] in forbidden and client["mobile"] in forbidden
        assert client["lastName"] in forbidden or client["firstName"] in forbidden
    assert len(world["ids"]) == len(set(world["ids"])) == 6


@pytest.mark.parametrize("role", ["manager", "reception"])
def test_no_page_shows_a_clients_data(world: dict[str, Any], console: Console, role: str) -> None:
    client = console.manager() if role == "manager" else console.reception()
    pages = _pages(console, client, world["ids"]) + world["answers"]
    # The audit search by a filed client's email: the entries, never the person.
    typed = world["chosen"][0]["email"]
    search = console.post(client, "/audit", {"lookup": "email", "value": typed}, "/audit")
    assert search.status_code == 200
    assert "request_erase" in search.text  # it found the filing
    assert search.text.count(typed) == 1 and f'value="{typed}"' in search.text
    pages.append(("audit search", search.text.replace(f'value="{typed}"', 'value=""')))
    assert _leaks(pages, _forbidden(world, console)) == []


def test_the_request_pages_show_client_ids_and_who_filed(world: dict[str, Any],
                                                         console: Console) -> None:
    page = console.manager().get(f"/requests/{world['ids'][3]}").text
    assert world["chosen"][3]["clientId"] in page
    assert "filed by desk" in page and "asked at the desk" in page


def test_an_ambiguous_email_shows_candidate_ids_and_nobodys_data(
    world: dict[str, Any], console: Console
) -> None:
    email = world["ambiguous"]
    holders = [c for c in world["everyone"] if c.get("email") == email and not (
        c.get("archived") or c.get("deleted") or c.get("mergedToClientId"))]
    assert len(holders) >= 2
    staff_clients = (console.manager(), console.reception())
    before = console.snapshot()
    for client in staff_clients:
        answer = console.file(client, "erase", email=email)
        assert answer.status_code == 422
        for holder in holders:
            assert holder["clientId"] in answer.text
        assert "client id" in answer.text and f"matches {len(holders)}" in answer.text
        # The typed address, in its field only; no name, number or other address.
        assert answer.text.count(email) == 1 and f'value="{email}"' in answer.text
        shown = answer.text.replace(f'value="{email}"', 'value=""')
        assert _leaks([("ambiguous", shown)], _forbidden(world, console)) == []
    assert console.snapshot() == before  # nothing filed


def test_a_refused_phone_is_reshown_only_in_its_field(world: dict[str, Any],
                                                      console: Console) -> None:
    typed = "+44 7700 900 999"  # a number no sandbox client has
    answer = console.file(console.reception(), "erase", phone=typed)
    assert answer.status_code == 422
    assert "no Phorest client has this phone number" in answer.text
    assert answer.text.count(typed) == 1


def test_the_search_finds_data_where_it_belongs_the_export_download(
    world: dict[str, Any], console: Console
) -> None:
    """The check above can fail: the export file, the one place for a person's data, trips it."""
    person = world["chosen"][2]
    download = console.manager().get(f"/requests/{world['ids'][2]}/export")
    assert download.status_code == 200
    leaks = {value for _, value in _leaks([("download", download.text)],
                                          _forbidden(world, console))}
    assert person["email"] in leaks and person["mobile"] in leaks
