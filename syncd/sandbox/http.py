"""The sandbox's HTTP plumbing: routing, request counting and fault injection.

Every emulator registers its routes on one :class:`Router`, tagged with the
vendor they imitate. One threaded server on loopback serves them all, so the
SDKs, the daemon and the tests talk real HTTP. Faults (latency, 429s, 5xx,
dropped connections, timeouts) are injected per vendor at run time through
the control API, and every answered request is counted by vendor, route
template and status.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY_BYTES = 16 * 1024 * 1024
TIMEOUT_FAULT_HOLD_SECONDS = 30.0
SHUTDOWN_POLL_SECONDS = 0.1
TIMING_SAMPLES_PER_ROUTE = 10_000
VENDORS = ("phorest", "mailchimp", "google", "sandbox")


@dataclass
class Request:
    """One parsed HTTP request, as a route handler sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)
    # Requests of this vendor in flight when this one arrived, itself included:
    # what a connection cap compares, so exactly the excess is refused.
    in_flight: int = 0

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            ValueError: the body is not JSON.
        """
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, str]:
        """The body parsed as ``application/x-www-form-urlencoded`` (last value wins)."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode("utf-8"), keep_blank_values=True).items()}


@dataclass
class Response:
    """What a route handler returns."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: Any, content_type: str = "application/json") -> Response:
    """A JSON body with the given status and content type."""
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), content_type)


def empty_response(status: int = 204) -> Response:
    """A response with no body and no content type, like Mailchimp's 204s."""
    return Response(status)


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    """A method and path template bound to a handler, tagged with its vendor."""

    vendor: str
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: Handler


class Router:
    """Maps (method, path) to handlers; path templates use ``{name}`` segments."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, vendor: str, method: str, template: str, handler: Handler) -> None:
        """Register a handler. ``{name}`` matches one path segment (no ``/`` or ``:``)."""
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/:]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}"))
        self.routes.append(Route(vendor, method, template, re.compile(f"^{regex}/?$"), handler))

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """The route for a request, its path parameters, and whether the path exists at all."""
        path_known = False
        for route in self.routes:
            found = route.pattern.match(path)
            if found:
                path_known = True
                if route.method == method:
                    return route, {k: unquote(v) for k, v in found.groupdict().items()}, True
        return None, {}, path_known

    def vendor_of(self, path: str) -> str:
        """Which vendor a path belongs to, for counting unmatched requests."""
        for route in self.routes:
            if path.startswith(route.template.split("{")[0]):
                return route.vendor
        return "sandbox"


@dataclass
class Faults:
    """Injected misbehaviour for one vendor. Rates are shares of requests, 0..1."""

    latency_ms: float = 0.0
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    rate_timeout: float = 0.0
    empty_429: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the control API."""
        return dict(self.__dict__)


class Traffic:
    """Request counters and fault settings, shared by every handler thread."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str, str, int]] = Counter()
        self.faults: dict[str, Faults] = {v: Faults() for v in VENDORS}
        self.in_flight: Counter[str] = Counter()
        # Server time of route handlers (faults excluded), the newest samples per route.
        self.timings: dict[tuple[str, str, str], deque[float]] = {}
        self._random = random.Random(seed)

    def count(self, vendor: str, method: str, template: str, status: int) -> None:
        """Record one answered (or dropped, status 0) request."""
        with self._lock:
            self.counts[(vendor, method, template, status)] += 1

    def time(self, vendor: str, method: str, template: str, seconds: float) -> None:
        """Record how long a route handler took."""
        key = (vendor, method, template)
        with self._lock:
            samples = self.timings.get(key)
            if samples is None:
                samples = self.timings[key] = deque(maxlen=TIMING_SAMPLES_PER_ROUTE)
            samples.append(seconds)

    def timing_summary(self) -> dict[str, dict[str, float]]:
        """Per route: sample count, median, 95th percentile and max handler time in ms."""
        out = {}
        with self._lock:
            items = [(k, sorted(v)) for k, v in self.timings.items()]
        for (vendor, method, template), samples in sorted(items):
            n = len(samples)
            out[f"{vendor} {method} {template}"] = {
                "samples": n,
                "p50_ms": round(samples[n // 2] * 1000, 3),
                "p95_ms": round(samples[min(n - 1, int(n * 0.95))] * 1000, 3),
                "max_ms": round(samples[-1] * 1000, 3),
            }
        return out

    def roll(self) -> float:
        """A random number from the sandbox's seeded generator."""
        with self._lock:
            return self._random.random()

    def enter(self, vendor: str) -> int:
        """Mark a request in flight; returns how many the vendor now has."""
        with self._lock:
            self.in_flight[vendor] += 1
            return self.in_flight[vendor]

    def leave(self, vendor: str) -> None:
        """Mark a request finished."""
        with self._lock:
            self.in_flight[vendor] -= 1

    def summary(self) -> dict[str, Any]:
        """Counts as nested plain data: vendor → "METHOD template" → status → n."""
        out: dict[str, Any] = {}
        with self._lock:
            for (vendor, method, template, status), n in sorted(self.counts.items()):
                routes = out.setdefault(vendor, {"total": 0, "routes": {}})
                routes["total"] += n
                routes["routes"].setdefault(f"{method} {template}", {})[str(status)] = n
        return out

    def reset_counts(self) -> None:
        """Forget every count and timing (faults stay)."""
        with self._lock:
            self.counts.clear()
            self.timings.clear()


class Dropped(Exception):
    """Raised by fault injection to close the connection without answering."""


class Emulator(Protocol):
    """What each vendor emulator offers the server."""

    vendor: str

    def register(self, router: Router) -> None:
        """Add the vendor's routes."""

    def fault_body(self, status: int) -> Response:
        """How this vendor answers an error of this status (used for injected faults too)."""

    def gate(self, request: Request) -> Response | None:
        """An admission check before the handler runs (e.g. a connection cap); None admits."""


class SandboxServer(ThreadingHTTPServer):
    """A threaded HTTP/1.1 server for a set of emulators, with counting and faults."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        emulators: Sequence[Emulator],
        traffic: Traffic | None = None,
        router: Router | None = None,
    ) -> None:
        super().__init__(address, _Handler)
        self.router = router or Router()
        self.traffic = traffic or Traffic()
        self.emulators = {e.vendor: e for e in emulators}
        for emulator in emulators:
            emulator.register(self.router)

    def fault_body(self, vendor: str, status: int) -> Response:
        """The vendor's own error shape for ``status``."""
        emulator = self.emulators.get(vendor)
        return emulator.fault_body(status) if emulator else _plain(status)

    def gate(self, vendor: str, request: Request) -> Response | None:
        """The vendor's admission check, if it has one."""
        emulator = self.emulators.get(vendor)
        return emulator.gate(request) if emulator else None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of this server."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve in a background thread."""
        thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="sandbox-http",
            daemon=True,
        )
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; without TCP_NODELAY, Nagle plus
    # the client's delayed ACK adds ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    server: SandboxServer
    server_version = "syncd-sandbox"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # Quiet: the control API's counters say what happened, and request
        # lines would carry emails in query strings.
        return

    def do_GET(self) -> None:  # noqa: N802
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815

    def _serve(self) -> None:
        split = urlsplit(self.path)
        router = self.server.router
        traffic = self.server.traffic
        route, params, known = router.match(self.command, split.path)
        vendor = route.vendor if route else router.vendor_of(split.path)
        template = route.template if route else "(unmatched)"
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(Response(413), vendor, template)
            return
        body = self.rfile.read(length) if length else b""
        request = Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            params=params,
        )
        request.in_flight = traffic.enter(vendor)
        try:
            response = self._faulted(vendor, request)
            if response is None:
                response = self.server.gate(vendor, request)
            if response is None:
                if route is None:
                    response = self.server.fault_body(vendor, 405 if known else 404)
                else:
                    started = time.perf_counter()
                    response = route.handler(request)
                    traffic.time(vendor, self.command, template, time.perf_counter() - started)
        except Dropped:
            traffic.count(vendor, self.command, template, 0)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        finally:
            traffic.leave(vendor)
        self._send(response, vendor, template)

    def _faulted(self, vendor: str, request: Request) -> Response | None:
        faults = self.server.traffic.faults.get(vendor)
        if faults is None or vendor == "sandbox":
            return None
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        roll = self.server.traffic.roll()
        edge = faults.rate_drop
        if roll < edge:
            raise Dropped
        edge += faults.rate_timeout
        if roll < edge:
            time.sleep(TIMEOUT_FAULT_HOLD_SECONDS)
            raise Dropped
        edge += faults.rate_429
        if roll < edge:
            if faults.empty_429:
                return Response(429)
            return self.server.fault_body(vendor, 429)
        edge += faults.rate_5xx
        if roll < edge:
            return self.server.fault_body(vendor, 503)
        return None

    def _send(self, response: Response, vendor: str, template: str) -> None:
        self.server.traffic.count(vendor, self.command, template, response.status)
        try:
            self.send_response(response.status)
            if response.content_type:
                self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if response.body and self.command != "HEAD":
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _plain(status: int) -> Response:
    return json_response(status, {"status": status, "message": _REASONS.get(status, "Error")})


_REASONS = {
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    503: "Service Unavailable",
}
