"""``syncd sandbox``: local emulators of every vendor, until interrupted."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from syncd import log
from syncd.cli._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Commands


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd sandbox`` to the command line."""
    sandbox = commands.add_parser(
        "sandbox",
        help="run local emulators of Phorest, Mailchimp, Google Analytics and SMTP",
        description="Start faithful local emulators of every vendor syncd talks to, seeded with "
        "synthetic clients, on loopback only. Runs until interrupted (Ctrl-C or SIGTERM).",
        parents=[common],
    )
    sandbox.add_argument("--clients", type=_non_negative_int, default=200, metavar="N",
                         help="synthetic clients to seed (default: 200)")
    sandbox.add_argument("--members", type=_non_negative_int, default=None, metavar="M",
                         help="top the audience up to M members with newsletter-only "
                         "subscribers (default: only what the clients produce)")
    sandbox.add_argument("--seed", type=int, default=0, metavar="S",
                         help="seed for the synthetic data (default: 0)")
    sandbox.add_argument("--host", default="127.0.0.1", help="loopback address (default: 127.0.0.1)")
    sandbox.add_argument("--port", type=_port, default=8900, metavar="P",
                         help="HTTP port for every emulator (default: 8900; 0 picks a free one)")
    sandbox.add_argument("--smtp-port", type=_port, default=8925, metavar="P",
                         help="SMTP sink port (default: 8925; 0 picks a free one)")
    sandbox.add_argument("--latency-ms", type=_non_negative_float, default=0.0, metavar="X",
                         help="latency added to every vendor request (default: 0)")
    sandbox.add_argument("--drift", type=_share, default=0.2, metavar="SHARE",
                         help="share of the Mailchimp audience that disagrees with Phorest "
                         "(default: 0.2)")
    sandbox.add_argument("--write-config", type=Path, metavar="PATH",
                         help="write a syncd config pointing at the sandbox (secrets beside it)")
    sandbox.set_defaults(handler=cmd_sandbox)


def cmd_sandbox(args: argparse.Namespace) -> int:
    """``syncd sandbox``: serve the emulators until interrupted."""
    # Imported here, not at the top: the sandbox is a development tool and the
    # daemon's own code paths never load it.
    from syncd.sandbox.app import Sandbox, check_config_path

    log.configure(args.log_level or "info")
    try:
        if args.write_config:  # before any port is taken
            check_config_path(args.write_config)
        sandbox = Sandbox(
            clients=args.clients,
            seed=args.seed,
            host=args.host,
            port=args.port,
            smtp_port=args.smtp_port,
            latency_ms=args.latency_ms,
            drift=args.drift,
            members=args.members,
        )
    except ValueError as exc:
        print(f"syncd sandbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"syncd sandbox: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_ERROR
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with sandbox:
        if args.write_config:
            try:
                sandbox.write_config(args.write_config)
            except (OSError, ValueError) as exc:  # e.g. a read-only directory
                problem = (f"cannot write {args.write_config}: {exc.strerror or type(exc).__name__}"
                           if isinstance(exc, OSError) else str(exc))
                print(f"syncd sandbox: {problem}", file=sys.stderr)
                return EXIT_ERROR
        _print_sandbox(sandbox, args.write_config)
        stop.wait()
    print("sandbox stopped", file=sys.stderr)
    return EXIT_OK



def _print_sandbox(sandbox: Any, config_path: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    base = sandbox.base_url
    table = Table(title="syncd sandbox", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("Phorest", f"{base}/third-party-api-server/api/business/"
                  f"{sandbox.credentials.phorest_business_id}")
    table.add_row("Mailchimp", f"{base}/3.0")
    table.add_row("Google token", f"{base}/token")
    table.add_row("Google Admin API", f"{base}/v1alpha, {base}/v1beta")
    if sandbox.smtp is not None:
        table.add_row("SMTP sink", f"{sandbox.smtp.host}:{sandbox.smtp.port}")
    table.add_row("Control API", f"{base}/_sandbox/")
    seeded = sandbox.report
    table.add_row("Seeded", f"{seeded.clients.get('total', 0)} clients, "
                  f"{seeded.members.get('total', 0)} members")
    if config_path is not None:
        table.add_row("Config", str(config_path))
    console = Console(stderr=True)
    console.print(table)
    console.print("Ctrl-C stops the sandbox.")
    sys.stderr.flush()


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number 0-65535")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


# argparse names the type in its messages ("invalid port value: 'x'").
_non_negative_int.__name__ = "count"
_non_negative_float.__name__ = "number"
_port.__name__ = "port"
_share.__name__ = "share"
