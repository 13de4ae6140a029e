"""The listener every syncd port uses: waitress with limits, over real sockets on loopback.

Limits are shortened here (a second, not ten) so the tests stay quick; waits
have hang guards and no test asserts how long anything took.
"""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from syncd import httpd, log
from syncd.httpd import HttpServer, Limits, serve

HANG_GUARD_SECONDS = 30.0
SHORT = Limits(body_bytes=1024, header_bytes=2048, request_seconds=1.0, idle_seconds=1.0)


class App:
    """A WSGI app that answers with the body it read, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.calls += 1
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body) + 3))])
        return [b"ok:" + body]


@pytest.fixture
def lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """What syncd logged during the test, as parsed JSON lines (each line must parse)."""
    stream = io.StringIO()
    log.configure("debug", "json", stream=stream)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        log.configure("warning")


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def server(app: App) -> Iterator[HttpServer]:
    running = serve(app, "127.0.0.1", 0, limits=SHORT)
    try:
        yield running
    finally:
        running.stop()


def connect(server: HttpServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD_SECONDS)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One response on a connection that stays open: the head, then Content-Length bytes."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def request(path: str = "/", body: bytes = b"", *headers: str, method: str = "POST") -> bytes:
    """A raw request; a Content-Length is added unless ``headers`` frame the body."""
    head = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    if not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_port_zero_binds_a_free_port_and_answers_over_http_1_1_keep_alive(
    server: HttpServer, app: App
) -> None:
    assert server.port > 0
    with connect(server) as sock:
        sock.sendall(request("/", b"one"))
        first = read_response(sock)
        sock.sendall(request("/", b"two", "Connection: close"))
        second = read_until_closed(sock)
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"ok:one")
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(b"ok:two")
    assert b"Server:" not in first
    assert app.calls == 2


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        (("Content-Length: 1025",), b"", b"413"),
        (("Transfer-Encoding: chunked",), b"801\r\n" + b"x" * 2049 + b"\r\n0\r\n\r\n", b"413"),
        (("Content-Length: -1",), b"x" * 10, b"400"),
        (("Content-Length: 1e3",), b"x" * 10, b"400"),
        (("X-Padding: " + "p" * 4096,), b"", b"431"),
    ],
    ids=["length-over-cap", "chunked-over-cap", "negative-length", "not-a-length",
         "headers-over-cap"],
)
def test_requests_past_the_limits_are_refused_before_the_app_runs(
    server: HttpServer, app: App, headers: tuple[str, ...], body: bytes, status: bytes
) -> None:
    with connect(server) as sock:
        sock.sendall(request("/", body, *headers))
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.") and answer.split(b" ")[1] == status
    assert app.calls == 0


def test_a_body_exactly_at_the_cap_is_served(server: HttpServer, app: App) -> None:
    with connect(server) as sock:
        sock.sendall(request("/", b"x" * SHORT.body_bytes, "Connection: close"))
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200")
    assert app.calls == 1


def test_a_silent_connection_is_closed_and_nothing_is_logged(
    server: HttpServer, app: App, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    with connect(server) as sock:
        assert read_until_closed(sock) == b""
    assert app.calls == 0
    assert lines() == []


def test_a_body_shorter_than_its_length_is_dropped_with_one_line(
    server: HttpServer, app: App, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    with connect(server) as sock:
        sock.sendall(request("/", b"short", "Content-Length: 100"))
        assert read_until_closed(sock) == b""  # we hold it open: the server ends it
    assert app.calls == 0
    assert [line["event"] for line in lines()] == ["http_request_cut"]


def test_a_client_dripping_bytes_faster_than_the_idle_limit_is_cut_by_the_request_limit(
    app: App, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    patient = Limits(request_seconds=1.0, idle_seconds=20.0)
    running = serve(app, "127.0.0.1", 0, limits=patient)
    payload = request("/", b"x" * 200)
    sent, cut = 0, False
    try:
        with connect(running) as sock:
            while sent < len(payload) and not cut:
                cut = bool(select.select([sock], [], [], 0)[0])  # closed by the server
                if not cut:
                    try:
                        sock.sendall(payload[sent:sent + 1])
                        sent += 1
                    except (BrokenPipeError, ConnectionResetError):
                        cut = True
                    time.sleep(0.05)  # 20 bytes a second: never idle for long
    finally:
        running.stop()
    assert cut and sent < len(payload)
    assert app.calls == 0
    assert [(line["event"], line["reason"]) for line in lines()] == [
        ("http_request_cut", "not received in time")]


def test_an_app_that_raises_answers_500_with_one_line_and_no_traceback(
    lines: Callable[[], list[dict[str, Any]]]
) -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise KeyError("secret-path-segment")

    running = serve(broken, "127.0.0.1", 0, limits=SHORT)
    try:
        with connect(running) as sock:
            sock.sendall(request("/webhooks/secret-path-segment", b"", "Connection: close",
                                 method="GET"))
            answer = read_until_closed(sock)
    finally:
        running.stop()
    assert answer.startswith(b"HTTP/1.1 500")
    logged = lines()
    assert [(line["event"], line["error"]) for line in logged] == [("http_app_failed", "KeyError")]
    assert "secret-path-segment" not in json.dumps(logged)


def test_waitress_messages_become_single_lines_without_paths(
    server: HttpServer, lines: Callable[[], list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The queue note is said at most once a while per process: an earlier test in this
    # worker may have said it moments ago, so this burst starts from a quiet handler.
    for handler in logging.getLogger("waitress.queue").handlers:
        if isinstance(handler, httpd._WaitressNotes):
            monkeypatch.setattr(handler, "_last_queue_note", float("-inf"))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("waitress").exception(
            "Exception while serving /webhooks/mailchimp/the-secret")
    for depth in range(1, 50):  # a burst: waitress warns on every queued request
        logging.getLogger("waitress.queue").warning("Task queue depth is %d", depth)
    logged = lines()
    assert [line["event"] for line in logged] == ["http_server_note", "http_requests_queued"]
    assert logged[0]["note"] == "Exception while serving"
    assert "the-secret" not in json.dumps(logged) and "Traceback" not in json.dumps(logged)


def test_stop_lets_an_answer_in_progress_finish_then_refuses_connections() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        entered.set()
        release.wait(HANG_GUARD_SECONDS)
        start_response("200 OK", [("Content-Length", "4")])
        return [b"done"]

    running = serve(slow, "127.0.0.1", 0, limits=SHORT)
    with connect(running) as sock:
        sock.sendall(request("/", method="GET"))
        assert entered.wait(HANG_GUARD_SECONDS)
        stopping = threading.Thread(target=running.stop)
        stopping.start()
        release.set()
        answer = read_until_closed(sock)
        stopping.join(HANG_GUARD_SECONDS)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"done")
    assert not stopping.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.port), timeout=HANG_GUARD_SECONDS)
