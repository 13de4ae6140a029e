"""One sandbox: every emulator on one loopback port, an SMTP sink, and a matching syncd config.

Used by ``syncd sandbox``, the end-to-end tests, the demo and the benchmarks.
The daemon's own code never imports this package.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from syncd.sandbox.control import ControlApi
from syncd.sandbox.google import GoogleEmulator
from syncd.sandbox.http import SandboxServer, Traffic
from syncd.sandbox.mailchimp import MailchimpEmulator
from syncd.sandbox.phorest import PhorestEmulator
from syncd.sandbox.seed import DEFAULT_DRIFT, SeedReport, seed_world
from syncd.sandbox.smtp import SmtpSink

PHOREST_PREFIX = "/third-party-api-server"


@dataclass(frozen=True)
class Credentials:
    """The sandbox's fixed, obviously fake credentials (it only listens on loopback)."""

    phorest_business_id: str = "sandbox-business"
    phorest_username: str = "global/manager@example.com"
    phorest_password: str = "sandbox-phorest-password"
    mailchimp_api_key: str = "0123456789abcdef0123456789abcdef-us1"
    mailchimp_list_id: str = "sandboxlist"
    mailchimp_webhook_secret: str = "sandbox-webhook-secret-0123456789"
    ga_property_id: str = "123456789"
    hmac_key: str = "sandbox-hmac-key-not-for-production"


class Sandbox:
    """Phorest, Mailchimp and Google emulators plus the control API on one port, and an SMTP sink.

    Args:
        clients: how many synthetic clients to seed (0: an empty world).
        seed: makes the seeded world reproducible.
        host: a loopback address to listen on.
        port: the HTTP port (0 picks a free one).
        smtp_port: the SMTP sink's port (0 picks a free one); None for no sink.
        latency_ms: latency injected into every vendor request.
        drift: share of the Mailchimp audience that disagrees with Phorest.
        members: top the audience up to this many members (see :func:`seed_world`).
        clock: "now" for seeding and the emulators.

    Raises:
        ValueError: a host that is not a loopback address.
    """

    def __init__(
        self,
        *,
        clients: int = 0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        smtp_port: int | None = 0,
        latency_ms: float = 0,
        drift: float = DEFAULT_DRIFT,
        members: int | None = None,
        clock: Callable[[], datetime] | None = None,
        credentials: Credentials = Credentials(),
    ) -> None:
        _require_loopback(host)
        self.credentials = c = credentials
        self.traffic = Traffic(seed)
        self.phorest = PhorestEmulator(
            c.phorest_business_id, c.phorest_username, c.phorest_password, clock=clock
        )
        self.mailchimp = MailchimpEmulator(
            c.mailchimp_api_key, c.mailchimp_list_id, clock=clock
        )
        self.google = GoogleEmulator((c.ga_property_id,), clock=clock)
        self.smtp = SmtpSink(host=host, port=smtp_port) if smtp_port is not None else None
        self.control = ControlApi(
            self.traffic, self.phorest, self.mailchimp, self.google, self.smtp, clock=clock
        )
        self.report: SeedReport = seed_world(
            self.phorest,
            self.mailchimp,
            clients=clients,
            seed=seed,
            drift=drift,
            members=members,
            clock=clock,
        )
        for vendor in ("phorest", "mailchimp", "google"):
            self.traffic.faults[vendor].latency_ms = latency_ms
        self.server = SandboxServer(
            (host, port),
            [self.phorest, self.mailchimp, self.google, self.control],
            self.traffic,
        )

    @property
    def base_url(self) -> str:
        """``http://host:port`` of every HTTP emulator."""
        return self.server.base_url

    def start(self) -> Sandbox:
        """Start serving HTTP and SMTP in background threads."""
        if self.smtp is not None:
            self.smtp.start()
        self.server.start()
        return self

    def stop(self) -> None:
        """Stop both servers and any webhook deliveries."""
        self.server.shutdown()
        self.server.server_close()
        if self.smtp is not None:
            self.smtp.stop()
        self.mailchimp.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def config(
        self, directory: Path, *, ledger_path: Path | None = None,
        daemon_listen: str = "127.0.0.1:8787", console_listen: str = "127.0.0.1:8788",
    ) -> dict[str, Any]:
        """A syncd configuration pointing every connector at this sandbox.

        Secrets are written as 0600 files in ``directory`` (0700, created if
        absent; its parent must exist) and referenced by ``*_file`` keys,
        exactly as a real installation would keep them.
        """
        c = self.credentials
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode yields to the umask, and the directory may be old
        secret = lambda name, value: str(_write_private(directory / name, value))  # noqa: E731
        info = self.google.service_account_info(f"{self.base_url}/token")
        sections: dict[str, Any] = {
            "ledger": {"path": str(ledger_path or directory / "ledger.sqlite3")},
            "identity": {"hmac_key_file": secret("identity_hmac_key", c.hmac_key)},
            "phorest": {
                "base_url": f"{self.base_url}{PHOREST_PREFIX}",
                "business_id": c.phorest_business_id,
                "username": c.phorest_username,
                "password_file": secret("phorest_password", c.phorest_password),
                "poll_interval_seconds": 5,
            },
            "mailchimp": {
                "base_url": f"{self.base_url}/3.0",
                "list_id": c.mailchimp_list_id,
                "api_key_file": secret("mailchimp_api_key", c.mailchimp_api_key),
                "webhook_secret_file": secret("mailchimp_webhook_secret", c.mailchimp_webhook_secret),
            },
            "google_analytics": {
                "property_id": c.ga_property_id,
                "credentials_file": secret("google_analytics_credentials", json.dumps(info)),
                "admin_base_url": self.base_url,
                # The emulator has no per-minute limit: no need to pace like Google.
                "writes_per_minute": 6000,
            },
            "daemon": {"listen": daemon_listen},
            "console": {"listen": console_listen},
        }
        if self.smtp is not None:
            sections["alerts"] = {
                "to": ["manager@example.com"],
                "from": "syncd@example.com",
                "smtp_host": self.smtp.host,
                "smtp_port": self.smtp.port,
                "smtp_security": "none",
            }
        return sections

    def write_config(self, path: Path, **kwargs: Any) -> Path:
        """Write :meth:`config` as TOML to ``path``, 0600 (secrets beside it in ``<path>.d/``).

        Raises:
            ValueError: ``path`` is a directory or its directory does not exist
                (see :func:`check_config_path`).
            OSError: the file cannot be written.
        """
        from syncd.config import render_toml

        check_config_path(path)
        sections = self.config(path.parent / f"{path.name}.d", **kwargs)
        header = (
            "# syncd configuration for the local sandbox, written by `syncd sandbox`.\n"
            f"# Sandbox started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at {self.base_url}.\n\n"
        )
        return _write_private(path, header + render_toml(sections))


def check_config_path(path: Path) -> None:
    """Refuse a config path that is a directory or whose directory does not exist.

    The sandbox never creates directories along the way: run as root with a
    mistyped path, it would otherwise leave them anywhere.

    Raises:
        ValueError: with a one-line reason.
    """
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path, e.g. {path / 'syncd.toml'}")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: the directory {path.parent} does not exist")


def _write_private(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # O_CREAT's mode only applies to a new file
        fh.write(value)
    return path


def _require_loopback(host: str) -> None:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise ValueError(f"cannot resolve host {host!r}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(
            f"the sandbox only listens on loopback (127.0.0.1, ::1, localhost), not {host!r}: "
            "its credentials are public"
        )
