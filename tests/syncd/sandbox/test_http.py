"""The sandbox server: routing, counting, per-vendor fault injection."""

from __future__ import annotations

import pytest
import requests

from collections.abc import Callable

from syncd.sandbox.http import Request, Response, Router, SandboxServer, Traffic, json_response

Serve = Callable[..., SandboxServer]


class EchoEmulator:
    """A tiny vendor: GET /echo/{word} answers the word; errors carry a marker."""

    vendor = "phorest"

    def register(self, router: Router) -> None:
        router.add(self.vendor, "GET", "/echo/{word}", self.echo)
        router.add(self.vendor, "POST", "/echo/{word}", self.echo)

    def echo(self, request: Request) -> Response:
        return json_response(200, {"word": request.params["word"], "q": request.arg("q")})

    def fault_body(self, status: int) -> Response:
        return json_response(status, {"vendor_error": status})

    def gate(self, request: Request) -> Response | None:
        return json_response(429, {"gated": True}) if request.arg("gate") else None


def test_routes_match_templates_and_decode_parameters(serve: Serve) -> None:
    server = serve(EchoEmulator())
    body = requests.get(f"{server.base_url}/echo/hello%20there?q=1", timeout=5).json()
    assert body == {"word": "hello there", "q": "1"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("DELETE", "/echo/x", 405)],
    ids=["unknown-path", "wrong-method"],
)
def test_unmatched_requests_get_the_vendor_error_shape(
    serve: Serve, method: str, path: str, status: int
) -> None:
    server = serve(EchoEmulator())
    response = requests.request(method, server.base_url + path, timeout=5)
    assert response.status_code == status
    if path.startswith("/echo"):
        assert response.json() == {"vendor_error": status}


def test_requests_are_counted_by_vendor_route_and_status(serve: Serve) -> None:
    server = serve(EchoEmulator())
    for _ in range(3):
        requests.get(f"{server.base_url}/echo/a", timeout=5)
    requests.get(f"{server.base_url}/echo/a?gate=1", timeout=5)
    routes = server.traffic.summary()["phorest"]["routes"]
    assert routes["GET /echo/{word}"] == {"200": 3, "429": 1}
    assert server.traffic.summary()["phorest"]["total"] == 4


@pytest.mark.parametrize(
    ("setting", "status"),
    [("rate_429", 429), ("rate_5xx", 503)],
    ids=["429", "5xx"],
)
def test_injected_errors_use_the_vendor_shape(serve: Serve, setting: str, status: int) -> None:
    server = serve(EchoEmulator())
    setattr(server.traffic.faults["phorest"], setting, 1.0)
    response = requests.get(f"{server.base_url}/echo/a", timeout=5)
    assert response.status_code == status
    assert response.json() == {"vendor_error": status}


def test_empty_429_has_no_body_and_no_content_type(serve: Serve) -> None:
    server = serve(EchoEmulator())
    server.traffic.faults["phorest"].rate_429 = 1.0
    server.traffic.faults["phorest"].empty_429 = True
    response = requests.get(f"{server.base_url}/echo/a", timeout=5)
    assert response.status_code == 429
    assert response.content == b"" and "Content-Type" not in response.headers


def test_dropped_connection_is_a_connection_error_and_counted_as_0(serve: Serve) -> None:
    server = serve(EchoEmulator())
    server.traffic.faults["phorest"].rate_drop = 1.0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.base_url}/echo/a", timeout=5)
    assert server.traffic.summary()["phorest"]["routes"]["GET /echo/{word}"] == {"0": 1}


def test_fault_rates_are_shares_of_requests(serve: Serve) -> None:
    server = serve(EchoEmulator(), traffic=Traffic(seed=7))
    server.traffic.faults["phorest"].rate_5xx = 0.5
    session = requests.Session()
    statuses = [session.get(f"{server.base_url}/echo/a", timeout=5).status_code for _ in range(200)]
    assert 60 < statuses.count(503) < 140
    assert statuses.count(503) + statuses.count(200) == 200


def test_faults_are_per_vendor(serve: Serve) -> None:
    server = serve(EchoEmulator())
    server.traffic.faults["mailchimp"].rate_5xx = 1.0
    assert requests.get(f"{server.base_url}/echo/a", timeout=5).status_code == 200


def test_keep_alive_serves_several_requests_on_one_connection(serve: Serve) -> None:
    server = serve(EchoEmulator())
    session = requests.Session()
    for _ in range(5):
        assert session.post(f"{server.base_url}/echo/a", data=b"x" * 10, timeout=5).ok
    assert server.traffic.summary()["phorest"]["total"] == 5


def test_timeout_fault_holds_the_request_until_the_client_gives_up(serve: Serve) -> None:
    server = serve(EchoEmulator())
    server.traffic.faults["phorest"].rate_timeout = 1.0
    with pytest.raises(requests.ReadTimeout):
        requests.get(f"{server.base_url}/echo/a", timeout=0.3)
    server.traffic.faults["phorest"].rate_timeout = 0.0
    assert requests.get(f"{server.base_url}/echo/a", timeout=5).status_code == 200
