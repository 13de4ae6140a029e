"""The daemon's HTTP listener, as a subprocess against the sandbox: load, slow and lying clients.

Every test talks raw HTTP over sockets, so the bytes on the wire are exactly
what the test says (a short body, a negative ``Content-Length``, one byte at a
time). Times are measured and printed, never asserted; a wait has a hang guard.
"""

from __future__ import annotations

import json
import select
import socket
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest

from syncd import config
from syncd.web import WEBHOOK_BODY_LIMIT_BYTES, WEBHOOK_PREFIX
from tests.e2e.test_daemon import Running, started_daemon

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

CONCURRENT_REQUESTS = 200  # of each kind, all at once
HANG_GUARD_SECONDS = 60.0  # a socket read that takes longer than this is a hang, not slowness
DRIP_EVERY_SECONDS = 0.5  # the slow client's pace: one byte per this many seconds
DRIP_GIVE_UP_SECONDS = 45.0  # a slow client still connected after this was never cut off


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp_path = tmp_path_factory.mktemp("daemon_http")
    with started_daemon(tmp_path, clients=50, seed=12, healthy_within_seconds=60) as run:
        yield run


@pytest.fixture
def hook(daemon: Running) -> str:
    secret = config.load(daemon.config_path).mailchimp.webhook_secret  # type: ignore[union-attr]
    assert secret is not None
    return f"{WEBHOOK_PREFIX}{secret.get_secret_value()}"


def inbox_count(daemon: Running) -> int:
    """Webhook events the daemon has recorded, processed or not."""
    path = config.load(daemon.config_path).ledger.path
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as ledger:
        return int(ledger.execute("SELECT count(*) FROM inbox").fetchone()[0])


def unsubscribe(email: str, **extra: str) -> bytes:
    return urlencode({"type": "unsubscribe", "fired_at": "2026-11-24 10:11:12",
                      "data[list_id]": "a6b5da1054", "data[email]": email, **extra}).encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    """A raw POST; ``headers`` replace the default Content-Length when one is given."""
    lines = [f"POST {path} HTTP/1.1", "Host: syncd", "Connection: close",
             "Content-Type: application/x-www-form-urlencoded", *headers]
    if not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    sock.settimeout(HANG_GUARD_SECONDS)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:80]
    return int(answer.split(b" ", 2)[1])


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_SECONDS) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def log_since(daemon: Running, offset: int) -> list[str]:
    return daemon.log_path.read_text()[offset:].splitlines()


def assert_quiet(lines: list[str]) -> None:
    """Each line is one JSON event, none a traceback, and the HTTP layer said one line at most."""
    assert not [line for line in lines if "Traceback" in line], lines
    events = [json.loads(line) for line in lines]  # a multi-line dump would not parse
    http = [e for e in events if e.get("logger", "").startswith(("waitress", "syncd.http"))]
    assert len(http) <= 1, http


def _percentiles(seconds: list[float]) -> str:
    cuts = statistics.quantiles(seconds, n=100)
    return f"p50={cuts[49] * 1000:.0f} ms p95={cuts[94] * 1000:.0f} ms max={max(seconds) * 1000:.0f} ms"


def test_200_concurrent_webhooks_and_200_concurrent_health_checks_are_all_answered(
    daemon: Running, hook: str,
) -> None:
    before = inbox_count(daemon)
    start = threading.Barrier(2 * CONCURRENT_REQUESTS)

    def call(request: bytes) -> tuple[int | str, float]:
        try:
            with socket.create_connection(("127.0.0.1", daemon.port),
                                          timeout=HANG_GUARD_SECONDS) as sock:
                start.wait(timeout=HANG_GUARD_SECONDS)  # every connection is open first
                began = time.perf_counter()
                sock.sendall(request)
                answer = read_until_closed(sock)
                return status_of(answer), time.perf_counter() - began
        except OSError as error:  # a reset or a refused connection
            return type(error).__name__, 0.0

    hooks = [post(hook, unsubscribe(f"load.{n}@example.com")) for n in range(CONCURRENT_REQUESTS)]
    health = [b"GET /healthz HTTP/1.1\r\nHost: syncd\r\nConnection: close\r\n\r\n"
              ] * CONCURRENT_REQUESTS
    with ThreadPoolExecutor(max_workers=2 * CONCURRENT_REQUESTS) as pool:
        answers = list(pool.map(call, [r for pair in zip(hooks, health) for r in pair]))
    hook_answers, health_answers = answers[0::2], answers[1::2]

    assert [status for status, _ in hook_answers] == [200] * CONCURRENT_REQUESTS
    assert [status for status, _ in health_answers] == [200] * CONCURRENT_REQUESTS
    assert inbox_count(daemon) - before == CONCURRENT_REQUESTS
    # Reported, not asserted: how long an answer took with 400 requests in flight.
    print(f"\n{CONCURRENT_REQUESTS} concurrent webhooks: "
          f"{_percentiles([s for _, s in hook_answers])}")
    print(f"{CONCURRENT_REQUESTS} concurrent /healthz: "
          f"{_percentiles([s for _, s in health_answers])}")


@pytest.mark.parametrize(
    "request_headers",
    [("Content-Length: -1",), ("Transfer-Encoding: chunked",), ()],
    ids=["negative-length", "chunked", "no-length"],
)
def test_a_body_past_the_cap_is_refused_whatever_its_framing_and_nothing_is_recorded(
    daemon: Running, hook: str, request_headers: tuple[str, ...],
) -> None:
    before = inbox_count(daemon)
    body = unsubscribe("too.big@example.com", **{"data[merges][NOTES]": "x" * (
        WEBHOOK_BODY_LIMIT_BYTES + 1024)})
    if "Transfer-Encoding: chunked" in request_headers:
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    request = post(hook, body, *request_headers)
    if not request_headers:  # no framing at all: the body is not the request's
        request = request.replace(f"Content-Length: {len(body)}\r\n".encode(), b"")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=HANG_GUARD_SECONDS) as sock:
        sock.sendall(request)
        try:
            answer = read_until_closed(sock)
        except ConnectionResetError:  # refused before the rest was read; the answer came first
            answer = b""
    if answer:
        assert status_of(answer) in (400, 413)
    assert inbox_count(daemon) == before


def test_a_body_shorter_than_its_length_on_a_held_open_connection_is_dropped_quietly(
    daemon: Running, hook: str,
) -> None:
    before, offset = inbox_count(daemon), len(daemon.log_path.read_text())
    body = unsubscribe("short.body@example.com")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=HANG_GUARD_SECONDS) as sock:
        sock.sendall(post(hook, body[:20], f"Content-Length: {len(body)}"))
        answer = read_until_closed(sock)  # held open by us: the daemon must end it
    assert answer == b"" or status_of(answer) in (400, 408)
    assert inbox_count(daemon) == before
    assert_quiet(log_since(daemon, offset))


def test_a_silent_connection_is_closed_without_a_traceback(daemon: Running) -> None:
    offset = len(daemon.log_path.read_text())
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=HANG_GUARD_SECONDS) as sock:
        assert read_until_closed(sock) == b""
    assert_quiet(log_since(daemon, offset))
    assert daemon.get("/healthz")[0] == 200


def test_a_client_dripping_one_byte_at_a_time_is_cut_off_before_it_finishes(
    daemon: Running, hook: str,
) -> None:
    before, offset = inbox_count(daemon), len(daemon.log_path.read_text())
    request = post(hook, unsubscribe("slow.drip@example.com"))
    sent, cut, began = 0, False, time.monotonic()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=HANG_GUARD_SECONDS) as sock:
        while sent < len(request) and time.monotonic() - began < DRIP_GIVE_UP_SECONDS:
            if select.select([sock], [], [], 0)[0]:
                cut = True  # the daemon closed the connection, or answered before the end
                break
            try:
                sock.sendall(request[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            sent += 1
            time.sleep(DRIP_EVERY_SECONDS)
        held = time.monotonic() - began
    print(f"\nslow client held {held:.1f} s, sent {sent} of {len(request)} bytes, cut off: {cut}")
    assert cut and sent < len(request), "the daemon never ended the dripping request"
    assert inbox_count(daemon) == before
    assert_quiet(log_since(daemon, offset))


def test_the_console_listens_apart_and_neither_listener_serves_the_others_paths(
    daemon: Running, hook: str,
) -> None:
    """An operator can proxy the webhook listener without exposing the console."""
    before, offset = inbox_count(daemon), len(daemon.log_path.read_text())
    assert daemon.console_port and daemon.console_port != daemon.port
    login = exchange(daemon.console_port, b"GET /login HTTP/1.1\r\nHost: syncd\r\n"
                     b"Connection: close\r\n\r\n")
    assert status_of(login) == 200 and b'id="login"' in login
    assert b"Content-Security-Policy: default-src 'none'" in login
    # The webhook listener knows nothing of the console, and the console nothing of
    # webhooks, health or metrics (an anonymous visitor is sent to the login page).
    assert status_of(exchange(daemon.port, b"GET /login HTTP/1.1\r\nHost: syncd\r\n"
                              b"Connection: close\r\n\r\n")) == 404
    for path in ("/healthz", "/metrics"):
        answer = exchange(daemon.console_port, f"GET {path} HTTP/1.1\r\nHost: syncd\r\n"
                          "Connection: close\r\n\r\n".encode())
        assert status_of(answer) == 302 and b"Location: /login" in answer
        assert b"syncd_processor_up" not in answer and b'"processors"' not in answer
    misplaced = exchange(daemon.console_port, post(hook, unsubscribe("misplaced@example.com")))
    assert status_of(misplaced) in (400, 403)
    # The console's requests are capped like the webhook's: a huge form is refused.
    try:
        huge = exchange(daemon.console_port, post("/login", b"name=" + b"x" * (
            WEBHOOK_BODY_LIMIT_BYTES + 1024)))
    except ConnectionResetError:  # refused before the rest was read
        huge = b""
    assert huge == b"" or status_of(huge) in (400, 413)
    assert inbox_count(daemon) == before
    assert_quiet(log_since(daemon, offset))


def test_the_daemon_still_stops_promptly_on_sigterm_with_connections_open(
    daemon: Running,
) -> None:
    # Last in the module: it stops the shared daemon.
    idle = [socket.create_connection(("127.0.0.1", daemon.port), timeout=HANG_GUARD_SECONDS)
            for _ in range(20)]
    try:
        daemon.process.terminate()
        assert daemon.process.wait(timeout=10) == 0
    finally:
        for sock in idle:
            sock.close()
    text = daemon.log_path.read_text()
    assert "daemon_stopped" in text and "Traceback" not in text
    assert "@example.com" not in text and "/webhooks/" not in text
