"""The Mailchimp emulator, driven through the real ``mailchimp-marketing`` SDK over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import mailchimp_marketing
import pytest
import requests
from mailchimp_marketing.api_client import ApiClientError

from connectors.base import Action
from connectors.mailchimp import MailchimpConnector
from syncd.config import MailchimpSettings
from syncd.sandbox import http as sandbox_http
from syncd.sandbox.http import SandboxServer
from syncd.sandbox.mailchimp import MailchimpEmulator

KEY = "0123456789abcdef0123456789abcdef-us6"
LIST_ID = "a1b2c3d4e5"
REQUEST_TIMEOUT_SECONDS = 10.0
WAIT_SECONDS = 5.0

MEMBER_KEYS = {
    "id", "email_address", "unique_email_id", "contact_id", "full_name", "web_id", "email_type",
    "status", "consents_to_one_to_one_messaging", "merge_fields", "stats", "ip_signup",
    "timestamp_signup", "ip_opt", "timestamp_opt", "member_rating", "last_changed", "language",
    "vip", "email_client", "location", "source", "tags_count", "tags", "list_id", "_links",
}


def md5(email: str) -> str:
    return hashlib.md5(email.lower().encode()).hexdigest()  # noqa: S324


def problem(err: ApiClientError) -> dict[str, Any]:
    """The problem+json body; the SDK leaves it a string because of the content type (A1.9)."""
    assert isinstance(err.text, str)
    return json.loads(err.text)


@pytest.fixture
def emulator() -> Iterator[MailchimpEmulator]:
    emu = MailchimpEmulator(KEY, LIST_ID, webhook_retry_delays_seconds=(0.05, 0.1, 0.2))
    yield emu
    emu.close()


@pytest.fixture
def server(serve: Callable[..., SandboxServer], emulator: MailchimpEmulator) -> SandboxServer:
    return serve(emulator)


def make_client(server: SandboxServer, key: str = KEY) -> mailchimp_marketing.Client:
    client = mailchimp_marketing.Client()
    client.set_config({"api_key": key, "server": "us6", "timeout": REQUEST_TIMEOUT_SECONDS})
    client.api_client.host = server.base_url + "/3.0"
    return client


@pytest.fixture
def client(server: SandboxServer) -> mailchimp_marketing.Client:
    return make_client(server)


class Receiver:
    """A tiny webhook endpoint: records every request; GET and POST answers are settable."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.get_status = 200
        self.post_statuses: list[int] = []  # consumed first, then 200
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                receiver._record(self, b"")
                self._answer(receiver.get_status)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver._record(self, body)
                with receiver._cond:
                    status = receiver.post_statuses.pop(0) if receiver.post_statuses else 200
                self._answer(status)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mailchimp/s3cret"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._cond:
            self.requests.append({"method": handler.command, "path": handler.path,
                                  "headers": dict(handler.headers), "body": body})
            self._cond.notify_all()

    def posts(self) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.requests if r["method"] == "POST"]

    def forms(self) -> list[list[tuple[str, str]]]:
        return [parse_qsl(r["body"].decode(), keep_blank_values=True) for r in self.posts()]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def seed(emulator: MailchimpEmulator, n: int, start: int = 1_700_000_000) -> list[str]:
    emails = [f"person{i:03d}@example.com" for i in range(n)]
    for i, email in enumerate(emails):
        emulator.add_member(email, merge_fields={"FNAME": f"F{i}", "LNAME": f"L{i}"},
                            last_changed=start + i)
    return emails


# ---------------------------------------------------------------------------- basics


def test_ping_answers_everything_is_chimpy(client: mailchimp_marketing.Client) -> None:
    assert client.ping.get() == {"health_status": "Everything's Chimpy!"}


@pytest.mark.parametrize("key", ["wrong-us6", ""], ids=["wrong key", "no key"])
def test_a_bad_or_missing_key_gets_401_problem_json(server: SandboxServer, key: str) -> None:
    with pytest.raises(ApiClientError) as caught:
        make_client(server, key).ping.get()
    assert caught.value.status_code == 401
    body = problem(caught.value)
    assert body["title"] == ("API Key Invalid" if key else "API Key Missing")
    assert set(body) == {"type", "title", "status", "detail", "instance"}


def test_errors_are_problem_json_with_the_request_id_as_instance(server: SandboxServer) -> None:
    answer = requests.get(f"{server.base_url}/3.0/lists/beef", auth=("any", KEY),
                          timeout=REQUEST_TIMEOUT_SECONDS)
    assert answer.status_code == 404
    assert answer.headers["Content-Type"] == "application/problem+json; charset=utf-8"
    assert answer.json()["title"] == "Resource Not Found"
    assert answer.json()["instance"] == answer.headers["X-Request-Id"]


def test_an_unknown_path_under_3_0_is_a_mailchimp_404(server: SandboxServer) -> None:
    answer = requests.get(f"{server.base_url}/3.0/nothing/here", auth=("any", KEY),
                          timeout=REQUEST_TIMEOUT_SECONDS)
    assert answer.status_code == 404
    assert answer.headers["Content-Type"] == "application/problem+json; charset=utf-8"


def test_the_api_root_describes_the_account(client: mailchimp_marketing.Client,
                                            emulator: MailchimpEmulator) -> None:
    seed(emulator, 2)
    assert client.root.get_root()["total_subscribers"] == 2


def test_the_list_reports_member_counts(client: mailchimp_marketing.Client,
                                        emulator: MailchimpEmulator) -> None:
    seed(emulator, 3)
    emulator.add_member("gone@example.com", "unsubscribed")
    info = client.lists.get_list(LIST_ID)
    assert (info["id"], info["stats"]["member_count"], info["stats"]["unsubscribe_count"]) == (
        LIST_ID, 3, 1)


# ---------------------------------------------------------------------------- listing


def test_members_page_by_count_and_offset_and_a_page_past_the_end_is_empty(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emails = seed(emulator, 25)
    pages = [client.lists.get_list_members_info(LIST_ID, count=10, offset=offset)
             for offset in (0, 10, 20, 30)]
    got = [m["email_address"] for page in pages for m in page["members"]]
    assert got == emails
    assert [len(p["members"]) for p in pages] == [10, 10, 5, 0]
    assert {p["total_items"] for p in pages} == {25}
    assert set(pages[0]) == {"members", "list_id", "total_items", "_links"}
    assert set(pages[0]["members"][0]) == MEMBER_KEYS


def test_count_defaults_to_ten(client: mailchimp_marketing.Client,
                               emulator: MailchimpEmulator) -> None:
    seed(emulator, 12)
    assert len(client.lists.get_list_members_info(LIST_ID)["members"]) == 10


def test_count_over_1000_is_refused_by_the_sdk_and_by_the_emulator(
    client: mailchimp_marketing.Client, server: SandboxServer
) -> None:
    with pytest.raises(ValueError):
        client.lists.get_list_members_info(LIST_ID, count=1001)
    answer = requests.get(f"{server.base_url}/3.0/lists/{LIST_ID}/members", params={"count": 1001},
                          auth=("any", KEY), timeout=REQUEST_TIMEOUT_SECONDS)
    assert answer.status_code == 400
    assert answer.json()["title"] == "Invalid Resource"


@pytest.mark.parametrize(
    ("status", "expected"),
    [(None, {"a@example.com", "u@example.com", "c@example.com", "p@example.com"}),
     ("subscribed", {"a@example.com"}),
     ("unsubscribed", {"u@example.com"}),
     ("cleaned", {"c@example.com"}),
     ("pending", {"p@example.com"}),
     ("archived", {"z@example.com"})],
    ids=["no filter leaves out archived", "subscribed", "unsubscribed", "cleaned", "pending",
         "archived only on request"],
)
def test_the_status_filter_selects_members(client: mailchimp_marketing.Client,
                                           emulator: MailchimpEmulator, status: str | None,
                                           expected: set[str]) -> None:
    for email, st in [("a@example.com", "subscribed"), ("u@example.com", "unsubscribed"),
                      ("c@example.com", "cleaned"), ("p@example.com", "pending"),
                      ("z@example.com", "archived")]:
        emulator.add_member(email, st)
    params = {"status": status} if status else {}
    page = client.lists.get_list_members_info(LIST_ID, count=100, **params)
    assert {m["email_address"] for m in page["members"]} == expected
    assert page["total_items"] == len(expected)


def test_since_last_changed_returns_members_changed_strictly_after(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emails = seed(emulator, 5, start=1_700_000_000)  # 2023-11-14T22:13:20+00:00 onwards
    page = client.lists.get_list_members_info(LIST_ID,
                                              since_last_changed="2023-11-14T22:13:22+00:00")
    assert [m["email_address"] for m in page["members"]] == emails[3:]
    future = client.lists.get_list_members_info(LIST_ID, since_last_changed="2030-01-01T00:00:00Z")
    assert (future["members"], future["total_items"]) == ([], 0)


def test_fields_and_exclude_fields_project_dotted_paths_from_the_root(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    seed(emulator, 2)
    lean = client.lists.get_list_members_info(
        LIST_ID, fields=["members.email_address", "members.status", "total_items"])
    assert lean == {"members": [{"email_address": "person000@example.com", "status": "subscribed"},
                                {"email_address": "person001@example.com", "status": "subscribed"}],
                    "total_items": 2}
    no_links = client.lists.get_list_members_info(LIST_ID,
                                                  exclude_fields=["members._links", "_links"])
    assert "_links" not in no_links and "_links" not in no_links["members"][0]
    # Root-relative paths: "email_address" is not a root key, so members keep theirs.
    quirk = client.lists.get_list_members_info(LIST_ID, exclude_fields=["email_address"])
    assert quirk["members"][0]["email_address"] == "person000@example.com"


# ---------------------------------------------------------------------------- single members


def test_get_list_member_by_hash_or_by_address_returns_the_member_object(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("Ada@Example.com", merge_fields={"FNAME": "Ada", "LNAME": "Byron"})
    by_hash = client.lists.get_list_member(LIST_ID, md5("ada@example.com"))
    by_email = client.lists.get_list_member(LIST_ID, "ada@example.com")
    assert by_hash == by_email
    assert set(by_hash) == MEMBER_KEYS
    assert by_hash["id"] == md5("ada@example.com")
    assert by_hash["merge_fields"] == {"FNAME": "Ada", "LNAME": "Byron", "ADDRESS": "", "PHONE": ""}
    assert by_hash["full_name"] == "Ada Byron"
    assert by_hash["last_changed"].endswith("+00:00")
    assert client.lists.get_list_member(LIST_ID, md5("ada@example.com"),
                                        fields=["status"]) == {"status": "subscribed"}


def test_an_unknown_member_is_404_with_the_raw_json_string_as_text(
    client: mailchimp_marketing.Client,
) -> None:
    with pytest.raises(ApiClientError) as caught:
        client.lists.get_list_member(LIST_ID, md5("nobody@example.com"))
    assert caught.value.status_code == 404
    assert problem(caught.value)["detail"] == "The requested resource could not be found."


def test_set_list_member_creates_with_status_if_new_and_updates_with_status(
    client: mailchimp_marketing.Client,
) -> None:
    h = md5("new@example.com")
    created = client.lists.set_list_member(LIST_ID, h, {
        "email_address": "new@example.com", "status_if_new": "subscribed",
        "merge_fields": {"FNAME": "New", "NOTATAG": "dropped"}})
    assert (created["status"], created["merge_fields"]["FNAME"]) == ("subscribed", "New")
    assert "NOTATAG" not in created["merge_fields"]
    # status_if_new is ignored for an existing member; status changes it.
    same = client.lists.set_list_member(LIST_ID, h, {"email_address": "new@example.com",
                                                     "status_if_new": "pending"})
    assert same["status"] == "subscribed"
    unsub = client.lists.set_list_member(LIST_ID, h, {"status": "unsubscribed"})
    assert (unsub["status"], unsub["unsubscribe_reason"]) == (
        "unsubscribed", "N/A (Unsubscribed by admin)")


def test_update_list_member_patches_an_existing_member_and_404s_otherwise(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("pat@example.com", merge_fields={"FNAME": "Pat"},
                        last_changed="2020-01-01T00:00:00+00:00")
    patched = client.lists.update_list_member(LIST_ID, md5("pat@example.com"),
                                              {"merge_fields": {"LNAME": "Kim"}})
    assert (patched["merge_fields"]["FNAME"], patched["merge_fields"]["LNAME"]) == ("Pat", "Kim")
    assert patched["last_changed"] > "2020-01-01T00:00:00+00:00"
    with pytest.raises(ApiClientError) as caught:
        client.lists.update_list_member(LIST_ID, md5("absent@example.com"),
                                        {"status": "subscribed"})
    assert caught.value.status_code == 404


def test_changing_the_address_moves_the_member_to_the_new_hash_keeping_its_contact(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    before = emulator.add_member("old@example.com")
    emulator.add_member("taken@example.com")
    moved = client.lists.update_list_member(LIST_ID, md5("old@example.com"),
                                            {"email_address": "new@example.com"})
    assert moved["id"] == md5("new@example.com")
    assert (moved["contact_id"], moved["unique_email_id"], moved["web_id"]) == (
        before["contact_id"], before["unique_email_id"], before["web_id"])
    assert emulator.member("old@example.com") is None
    with pytest.raises(ApiClientError) as caught:
        client.lists.update_list_member(LIST_ID, md5("new@example.com"),
                                        {"email_address": "taken@example.com"})
    assert problem(caught.value)["title"] == "Member Exists"


def test_adding_an_existing_member_by_post_is_400_member_exists(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("here@example.com")
    with pytest.raises(ApiClientError) as caught:
        client.lists.add_list_member(LIST_ID, {"email_address": "here@example.com",
                                               "status": "subscribed"})
    assert problem(caught.value)["detail"] == (
        "here@example.com is already a list member. Use PUT to insert or update list members.")


def test_delete_list_member_archives_with_an_empty_204_and_a_repeat_is_405(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("arc@example.com")
    answer = client.lists.delete_list_member(LIST_ID, md5("arc@example.com"))
    assert isinstance(answer, requests.Response)
    assert (answer.status_code, answer.content) == (204, b"")
    assert client.lists.get_list_member(LIST_ID, md5("arc@example.com"))["status"] == "archived"
    with pytest.raises(ApiClientError) as caught:
        client.lists.delete_list_member(LIST_ID, md5("arc@example.com"))
    assert (caught.value.status_code, problem(caught.value)["title"]) == (405, "Method Not Allowed")
    with pytest.raises(ApiClientError) as absent:
        client.lists.delete_list_member(LIST_ID, md5("never@example.com"))
    assert absent.value.status_code == 404


def test_delete_list_member_permanent_is_204_and_then_the_member_is_404(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("erase@example.com")
    answer = client.lists.delete_list_member_permanent(LIST_ID, md5("erase@example.com"))
    assert isinstance(answer, requests.Response) and answer.status_code == 204
    with pytest.raises(ApiClientError) as caught:
        client.lists.get_list_member(LIST_ID, md5("erase@example.com"))
    assert caught.value.status_code == 404
    assert isinstance(caught.value.text, str)  # problem+json is not parsed by the SDK
    assert json.loads(caught.value.text)["title"] == "Resource Not Found"
    assert emulator.is_forgotten("erase@example.com")


FORGOTTEN = "forgot@example.com"


@pytest.mark.parametrize(
    "readd",
    [
        lambda c: c.lists.set_list_member(LIST_ID, md5(FORGOTTEN), {
            "email_address": FORGOTTEN, "status_if_new": "subscribed"}),
        lambda c: c.lists.set_list_member(LIST_ID, md5(FORGOTTEN), {
            "email_address": FORGOTTEN, "status_if_new": "pending"}),
        lambda c: c.lists.set_list_member(LIST_ID, md5(FORGOTTEN), {
            "email_address": FORGOTTEN, "status_if_new": "unsubscribed"}),
        lambda c: c.lists.add_list_member(LIST_ID, {"email_address": FORGOTTEN,
                                                    "status": "subscribed"}),
        lambda c: c.lists.update_list_member(LIST_ID, md5(FORGOTTEN), {"status": "unsubscribed"}),
    ],
    ids=["PUT subscribed", "PUT pending", "PUT unsubscribed", "POST", "PATCH unsubscribed"],
)
def test_a_permanently_deleted_address_cannot_be_re_added(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator,
    readd: Callable[[mailchimp_marketing.Client], Any],
) -> None:
    emulator.add_member(FORGOTTEN)
    client.lists.delete_list_member_permanent(LIST_ID, md5(FORGOTTEN))
    with pytest.raises(ApiClientError) as caught:
        readd(client)
    body = problem(caught.value)
    assert (caught.value.status_code, body["title"]) == (400, "Forgotten Email Not Subscribed")
    # A hash-only PATCH has no address to name (it was erased), so the hash stands in for it.
    assert body["detail"].split(" ", 1) in (
        [name, "was permanently deleted and cannot be re-imported. "
               "The contact must re-subscribe to get back on the list."]
        for name in (FORGOTTEN, md5(FORGOTTEN)))
    assert emulator.confirmation_emails_sent == 0


def test_a_batch_re_add_of_a_forgotten_address_is_a_per_member_error(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member(FORGOTTEN)
    client.lists.delete_list_member_permanent(LIST_ID, md5(FORGOTTEN))
    result = client.lists.batch_list_members(LIST_ID, {
        "members": [{"email_address": FORGOTTEN, "status": "subscribed"}], "update_existing": True})
    assert result["error_count"] == 1
    assert "was permanently deleted" in result["errors"][0]["error"]


def test_only_a_hosted_signup_brings_a_forgotten_address_back(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member(FORGOTTEN)
    client.lists.delete_list_member_permanent(LIST_ID, md5(FORGOTTEN))
    emulator.signup(FORGOTTEN, "Back", "Again")
    assert client.lists.get_list_member(LIST_ID, md5(FORGOTTEN))["status"] == "subscribed"


@pytest.mark.parametrize("current", ["unsubscribed", "cleaned"])
@pytest.mark.parametrize(
    "resubscribe",
    [
        lambda c, e: c.lists.set_list_member(LIST_ID, md5(e), {"email_address": e,
                                                               "status": "subscribed"}),
        lambda c, e: c.lists.update_list_member(LIST_ID, md5(e), {"status": "subscribed"}),
    ],
    ids=["PUT", "PATCH"],
)
def test_subscribing_an_unsubscribed_or_cleaned_member_is_400_member_in_compliance_state(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator, current: str,
    resubscribe: Callable[[mailchimp_marketing.Client, str], Any],
) -> None:
    emulator.add_member("opted@example.com", current)
    with pytest.raises(ApiClientError) as caught:
        resubscribe(client, "opted@example.com")
    body = problem(caught.value)
    assert (caught.value.status_code, body["title"]) == (400, "Member In Compliance State")
    assert body["detail"].startswith("opted@example.com is in a compliance state")
    assert emulator.member("opted@example.com")["status"] == current


def test_pending_is_the_only_way_back_and_counts_a_confirmation_email(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("opted@example.com", "unsubscribed")
    result = client.lists.batch_list_members(LIST_ID, {
        "members": [{"email_address": "opted@example.com", "status": "subscribed"}],
        "update_existing": True})
    assert "compliance state" in result["errors"][0]["error"]
    assert emulator.confirmation_emails_sent == 0
    member = client.lists.update_list_member(LIST_ID, md5("opted@example.com"),
                                             {"status": "pending"})
    assert member["status"] == "pending"
    assert emulator.confirmation_emails_sent == 1


# ---------------------------------------------------------------------------- batches


def test_batch_list_members_answers_200_with_per_member_errors(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("old@example.com", "subscribed")
    emulator.add_member("kept@example.com", "subscribed")
    body = {"members": [{"email_address": "fresh@example.com", "status": "subscribed"},
                        {"email_address": "old@example.com", "status": "unsubscribed"},
                        {"email_address": "not-an-address", "status": "subscribed"}],
            "update_existing": True}
    result = client.lists.batch_list_members(LIST_ID, body)
    assert [m["email_address"] for m in result["new_members"]] == ["fresh@example.com"]
    assert [(m["email_address"], m["status"]) for m in result["updated_members"]] == [
        ("old@example.com", "unsubscribed")]
    assert (result["total_created"], result["total_updated"], result["error_count"]) == (1, 1, 1)
    assert result["errors"][0]["email_address"] == "not-an-address"
    exists = client.lists.batch_list_members(LIST_ID, {
        "members": [{"email_address": "kept@example.com", "status": "unsubscribed"}],
        "update_existing": False})
    assert exists["errors"][0]["error_code"] == "ERROR_CONTACT_EXISTS"
    assert emulator.member("kept@example.com")["status"] == "subscribed"


def test_batch_list_members_refuses_more_than_500_members(
    client: mailchimp_marketing.Client,
) -> None:
    members = [{"email_address": f"p{i}@example.com", "status": "subscribed"} for i in range(501)]
    with pytest.raises(ApiClientError) as caught:
        client.lists.batch_list_members(LIST_ID, {"members": members})
    assert caught.value.status_code == 400


def test_batch_operations_run_in_the_background_and_finish_with_results(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_member("a@example.com")
    emulator.add_member("b@example.com", "unsubscribed")
    ops = [
        {"method": "PATCH", "path": f"/lists/{LIST_ID}/members/{md5('a@example.com')}",
         "body": json.dumps({"status": "unsubscribed"}), "operation_id": "unsub-a"},
        {"method": "PUT", "path": f"/lists/{LIST_ID}/members/{md5('b@example.com')}",
         "body": json.dumps({"email_address": "b@example.com", "status": "subscribed"}),
         "operation_id": "resub-b"},
        {"method": "GET", "path": f"/lists/{LIST_ID}/members", "params": {"count": 1},
         "operation_id": "page"},
    ]
    started = client.batches.start({"operations": ops})
    assert started["status"] in {"pending", "started", "finished"}
    deadline = time.monotonic() + WAIT_SECONDS
    status = client.batches.status(started["id"])
    while status["status"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.02)
        status = client.batches.status(started["id"])
    assert (status["status"], status["total_operations"], status["finished_operations"],
            status["errored_operations"]) == ("finished", 3, 3, 1)
    assert status["completed_at"] and status["submitted_at"]
    download = requests.get(status["response_body_url"], timeout=REQUEST_TIMEOUT_SECONDS)
    assert download.headers["Content-Type"] == "application/gzip"
    [results] = archived_results(download.content).values()
    assert [(r["operation_id"], r["status_code"]) for r in results] == [
        ("unsub-a", 200), ("resub-b", 400), ("page", 200)]
    assert json.loads(results[1]["response"])["title"] == "Member In Compliance State"
    assert emulator.member("a@example.com")["status"] == "unsubscribed"


def archived_results(archive: bytes) -> dict[str, list[dict[str, Any]]]:
    """The JSON files of a ``response_body_url`` download (a ``.tar.gz``), by name."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        files = [(m.name, tar.extractfile(m)) for m in tar if m.isfile()]
        return {name: json.load(file) for name, file in files if file is not None}


def finished(client: mailchimp_marketing.Client, batch_id: str) -> dict[str, Any]:
    """Poll a batch until it is finished (or WAIT_SECONDS pass)."""
    deadline = time.monotonic() + WAIT_SECONDS
    status = client.batches.status(batch_id)
    while status["status"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.02)
        status = client.batches.status(batch_id)
    return status


def test_batch_results_are_a_tar_gz_of_json_files_of_at_most_100_results_each(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator, server: SandboxServer
) -> None:
    emails = [f"p{n}@example.com" for n in range(250)]
    for email in emails:
        emulator.add_member(email)
    ops = [{"method": "PATCH", "path": f"/lists/{LIST_ID}/members/{md5(email)}",
            "params": {"skip_merge_validation": "true"},
            "body": json.dumps({"merge_fields": {"FNAME": f"N{n}"}}), "operation_id": str(n)}
           for n, email in enumerate(emails)]
    status = finished(client, client.batches.start({"operations": ops})["id"])
    url = status["response_body_url"]
    assert url.endswith(f"/_batch_results/{status['id']}.tar.gz")
    files = archived_results(requests.get(url, timeout=REQUEST_TIMEOUT_SECONDS).content)
    assert sorted(len(f) for f in files.values()) == [50, 100, 100]
    results = [r for name in sorted(files) for r in files[name]]
    assert [r["operation_id"] for r in results] == [str(n) for n in range(250)]
    assert {r["status_code"] for r in results} == {200}
    assert json.loads(results[7]["response"])["merge_fields"]["FNAME"] == "N7"
    assert emulator.member("p249@example.com")["merge_fields"]["FNAME"] == "N249"


def test_operations_inside_a_batch_do_not_pay_the_injected_latency(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator, server: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # latency_ms models the client's link: the batch's own calls pay it, not its operations.
    waits: list[float] = []
    fake_time = types.SimpleNamespace(sleep=waits.append, perf_counter=time.perf_counter)
    monkeypatch.setattr(sandbox_http, "time", fake_time)
    emulator.add_member("a@example.com")
    ops = [{"method": "GET", "path": f"/lists/{LIST_ID}/members/{md5('a@example.com')}",
            "operation_id": str(n)} for n in range(40)]
    server.traffic.reset_counts()
    server.traffic.faults["mailchimp"].latency_ms = 100
    status = finished(client, client.batches.start({"operations": ops})["id"])
    assert (status["status"], status["finished_operations"]) == ("finished", 40)
    summary = server.traffic.summary()["mailchimp"]
    assert waits == [0.1] * summary["total"]  # the start and each poll: one wait each
    assert set(summary["routes"]) == {"POST /3.0/batches", "GET /3.0/batches/{batch_id}"}


def test_the_connector_rectifies_and_erases_through_batches_end_to_end(
    emulator: MailchimpEmulator, server: SandboxServer
) -> None:
    # The real connector against the emulator: 600 update_names + 300 clear_extra_fields +
    # 50 erases (+ 1 of an absent address) are 951 operations, so 2 POST /batches, no PATCH.
    renamed = [f"n{i}@example.com" for i in range(600)]
    cleared = [f"c{i}@example.com" for i in range(300)]
    erased = [f"e{i}@example.com" for i in range(50)]
    emulator.add_members(
        [{"email": e, "status": "unsubscribed" if i % 10 == 0 else "subscribed",
          "merge_fields": {"FNAME": "Old", "LNAME": "Name", "PHONE": "555-0100"}}
         for i, e in enumerate(renamed)]
        + [{"email": e, "merge_fields": {"FNAME": f"C{i}", "PHONE": "555-0101"}}
           for i, e in enumerate(cleared)]
        + [{"email": e} for e in erased])
    todo = ([Action("update_names", f"k{i}", email=e, first_name=f"New{i}", last_name="N")
             for i, e in enumerate(renamed)]
            + [Action("clear_extra_fields", "k", email=e, fields=("PHONE",)) for e in cleared]
            + [Action("erase", "k", email=e) for e in [*erased, "ghost@example.com"]])
    settings = MailchimpSettings(api_key=KEY, list_id=LIST_ID, base_url=server.base_url + "/3.0",
                                 max_connections=4)
    connector = MailchimpConnector(settings, sleep=lambda seconds: time.sleep(seconds / 50))
    server.traffic.reset_counts()
    outcomes = connector.apply(todo)
    assert [o.action for o in outcomes] == todo
    assert [(o.status, o.reason) for o in outcomes] == (
        [("done", None)] * 950 + [("done", "absent")])
    routes = server.traffic.summary()["mailchimp"]["routes"]
    assert routes["POST /3.0/batches"] == {"200": 2}
    assert routes["GET /3.0/_batch_results/{batch_id}.tar.gz"] == {"200": 2}
    assert routes["GET /3.0/lists/{list_id}"] == {"200": 1}  # the list check of the absent one
    assert set(routes) == {"POST /3.0/batches", "GET /3.0/batches/{batch_id}",
                           "GET /3.0/_batch_results/{batch_id}.tar.gz", "GET /3.0/lists/{list_id}"}
    members = {r.email: r for r in connector.scan()}
    assert len(members) == 900
    for i, email in enumerate(renamed):  # renamed, and never (re)subscribed
        record = members[email]
        assert (record.first_name, record.last_name, record.extra_fields) == (
            f"New{i}", "N", ("PHONE",))
        assert record.status == ("unsubscribed" if i % 10 == 0 else "subscribed")
    for i, email in enumerate(cleared):
        assert (members[email].first_name, members[email].extra_fields) == (f"C{i}", ())
    assert all(emulator.member(e) is None for e in erased)
    assert emulator.members_count() == 900


# ---------------------------------------------------------------------------- limits and faults


def test_more_than_ten_simultaneous_requests_get_429_too_many_requests(
    client: mailchimp_marketing.Client, server: SandboxServer
) -> None:
    server.traffic.faults["mailchimp"].latency_ms = 300
    outcomes: list[Any] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            result: Any = client.ping.get()
        except ApiClientError as err:
            result = err
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=call) for _ in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_SECONDS)
    refused = [o for o in outcomes if isinstance(o, ApiClientError)]
    assert len(outcomes) == 15 and refused
    assert {e.status_code for e in refused} == {429}
    body = problem(refused[0])
    assert (body["title"], body["detail"]) == (
        "TooManyRequests", "You have exceeded the limit of 10 simultaneous connections.")
    server.traffic.faults["mailchimp"].latency_ms = 0
    assert client.ping.get()["health_status"]  # one at a time is admitted again


def test_an_empty_bodied_429_comes_back_as_a_response_not_an_exception(
    client: mailchimp_marketing.Client, server: SandboxServer
) -> None:
    faults = server.traffic.faults["mailchimp"]
    faults.empty_429, faults.rate_429 = True, 1.0
    answer = client.ping.get()
    assert isinstance(answer, requests.Response) and answer.status_code == 429


def test_an_injected_503_is_problem_json(client: mailchimp_marketing.Client,
                                        server: SandboxServer) -> None:
    server.traffic.faults["mailchimp"].rate_5xx = 1.0
    with pytest.raises(ApiClientError) as caught:
        client.ping.get()
    assert (caught.value.status_code, problem(caught.value)["status"]) == (503, 503)


# ---------------------------------------------------------------------------- webhooks


def test_creating_a_webhook_sends_the_validator_get_first(
    client: mailchimp_marketing.Client, receiver: Receiver
) -> None:
    hook = client.lists.create_list_webhook(LIST_ID, {
        "url": receiver.url, "events": {"unsubscribe": True}, "sources": {"api": True}})
    assert receiver.requests[0]["method"] == "GET"
    assert receiver.requests[0]["headers"]["User-Agent"] == "MailChimp.com WebHook Validator"
    assert hook["events"]["unsubscribe"] and hook["sources"]["api"]
    listed = client.lists.get_list_webhooks(LIST_ID)
    assert [w["id"] for w in listed["webhooks"]] == [hook["id"]]
    assert client.lists.delete_list_webhook(LIST_ID, hook["id"]).status_code == 204


def test_a_webhook_whose_url_fails_validation_is_refused(
    client: mailchimp_marketing.Client, receiver: Receiver
) -> None:
    receiver.get_status = 404
    with pytest.raises(ApiClientError) as caught:
        client.lists.create_list_webhook(LIST_ID, {"url": receiver.url})
    body = problem(caught.value)
    assert (caught.value.status_code, body["title"]) == (400, "Invalid Resource")
    assert body["detail"].startswith("The resource submitted could not be validated")


def test_click_unsubscribe_delivers_a_form_encoded_unsubscribe_post(
    emulator: MailchimpEmulator, server: SandboxServer, receiver: Receiver
) -> None:
    emulator.add_member("click@example.com", merge_fields={"FNAME": "Cli", "LNAME": "Ck"})
    emulator.add_webhook(receiver.url)
    member = emulator.click_unsubscribe("click@example.com", campaign_id="cmp1")
    assert member["status"] == "unsubscribed"
    assert emulator.drain_webhooks(WAIT_SECONDS)
    [post] = receiver.posts()
    assert post["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert post["headers"]["User-Agent"] == "MailChimp.com"
    form = dict(parse_qsl(post["body"].decode(), keep_blank_values=True))
    assert set(form) == {
        "type", "fired_at", "data[action]", "data[reason]", "data[campaign_id]", "data[id]",
        "data[email]", "data[email_type]", "data[ip_opt]", "data[web_id]", "data[merges][EMAIL]",
        "data[merges][FNAME]", "data[merges][LNAME]", "data[merges][ADDRESS]",
        "data[merges][PHONE]", "data[list_id]"}
    assert (form["type"], form["data[action]"], form["data[reason]"]) == ("unsubscribe", "unsub",
                                                                          "manual")
    assert (form["data[email]"], form["data[merges][FNAME]"], form["data[list_id]"]) == (
        "click@example.com", "Cli", LIST_ID)
    assert form["data[id]"] == member["unique_email_id"]
    assert time.strptime(form["fired_at"], "%Y-%m-%d %H:%M:%S")
    assert emulator.webhook_log()[-1] | {"url": ""} == {
        "url": "", "type": "unsubscribe", "source": "user", "attempt": 1, "status": 200, "ok": True}


@pytest.mark.parametrize(("api_source", "echoed"), [(False, False), (True, True)],
                         ids=["api source off: no echo", "api source on: echoed"])
def test_api_unsubscribes_echo_back_only_when_the_api_source_is_on(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator, receiver: Receiver,
    api_source: bool, echoed: bool,
) -> None:
    emulator.add_member("api@example.com")
    emulator.add_member("user@example.com")
    client.lists.create_list_webhook(LIST_ID, {
        "url": receiver.url, "events": {"unsubscribe": True},
        "sources": {"user": True, "admin": True, "api": api_source}})
    client.lists.update_list_member(LIST_ID, md5("api@example.com"), {"status": "unsubscribed"})
    emulator.click_unsubscribe("user@example.com")  # a delivery that always arrives, as a marker
    assert emulator.drain_webhooks(WAIT_SECONDS)
    emails = [dict(f)["data[email]"] for f in receiver.forms()]
    assert emails == (["api@example.com", "user@example.com"] if echoed else ["user@example.com"])


def test_a_failed_delivery_is_retried_and_each_attempt_is_logged(
    emulator: MailchimpEmulator, server: SandboxServer, receiver: Receiver
) -> None:
    emulator.add_member("bounce@example.com")
    emulator.add_webhook(receiver.url, events={"cleaned": True})
    receiver.post_statuses = [500, 503]
    emulator.hard_bounce("bounce@example.com")
    assert emulator.drain_webhooks(WAIT_SECONDS)
    assert [(e["attempt"], e["status"]) for e in emulator.webhook_log()] == [
        (1, 500), (2, 503), (3, 200)]
    form = receiver.forms()[-1]
    assert form[0] == ("type", "cleaned")
    assert dict(form)["data[reason]"] == "hard"
    assert emulator.member("bounce@example.com")["status"] == "cleaned"


@pytest.mark.parametrize(
    ("act", "source", "expected"),
    [
        (lambda e, c: e.spam_complaint("who@example.com"), "user",
         {"type": "unsubscribe", "data[action]": "unsub", "data[reason]": "abuse"}),
        (lambda e, c: e.update_profile("who@example.com", {"FNAME": "Renamed"}), "user",
         {"type": "profile", "data[merges][FNAME]": "Renamed"}),
        (lambda e, c: e.signup("someone.new@example.com", "Some", "One"), "user",
         {"type": "subscribe", "data[email]": "someone.new@example.com"}),
        (lambda e, c: c.lists.delete_list_member(LIST_ID, md5("who@example.com")), "api",
         {"type": "unsubscribe", "data[action]": "delete", "data[reason]": "manual"}),
        (lambda e, c: c.lists.delete_list_member_permanent(LIST_ID, md5("who@example.com")), "api",
         {"type": "unsubscribe", "data[action]": "delete", "data[email]": "who@example.com"}),
        (lambda e, c: c.lists.set_list_member(LIST_ID, md5("fresh@example.com"), {
            "email_address": "fresh@example.com", "status_if_new": "subscribed"}), "api",
         {"type": "subscribe", "data[email]": "fresh@example.com"}),
    ],
    ids=["spam complaint", "profile update", "hosted signup", "API archive",
         "API delete-permanent", "API subscribe"],
)
def test_each_change_fires_its_webhook_event(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator, receiver: Receiver,
    act: Callable[[MailchimpEmulator, mailchimp_marketing.Client], Any], source: str,
    expected: dict[str, str],
) -> None:
    emulator.add_member("who@example.com", merge_fields={"FNAME": "Who"})
    emulator.add_webhook(receiver.url, sources={"user": True, "admin": True, "api": True})
    act(emulator, client)
    assert emulator.drain_webhooks(WAIT_SECONDS)
    [form] = [dict(f) for f in receiver.forms()]
    assert {k: form.get(k) for k in expected} == expected
    assert [e["source"] for e in emulator.webhook_log()] == [source]


def test_a_change_of_address_fires_upemail_with_old_and_new(
    emulator: MailchimpEmulator, server: SandboxServer, receiver: Receiver
) -> None:
    emulator.add_member("before@example.com")
    emulator.add_webhook(receiver.url)
    emulator.change_email("before@example.com", "after@example.com")
    assert emulator.drain_webhooks(WAIT_SECONDS)
    form = dict(receiver.forms()[0])
    assert (form["type"], form["data[old_email]"], form["data[new_email]"]) == (
        "upemail", "before@example.com", "after@example.com")


# ---------------------------------------------------------------------------- scale


def test_a_1000_member_page_of_100000_members_is_fast(
    client: mailchimp_marketing.Client, emulator: MailchimpEmulator
) -> None:
    emulator.add_members({"email": f"p{i}@example.com", "last_changed": 1_700_000_000 + i}
                         for i in range(100_000))
    started = time.perf_counter()
    page = client.lists.get_list_members_info(
        LIST_ID, count=1000, offset=99_000,
        fields=["members.email_address", "members.status", "members.last_changed", "total_items"])
    elapsed_seconds = time.perf_counter() - started
    assert (len(page["members"]), page["total_items"]) == (1000, 100_000)
    assert page["members"][-1]["email_address"] == "p99999@example.com"
    assert elapsed_seconds < 2.0
