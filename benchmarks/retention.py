"""Retention purge dry run: the Phorest calls and wall time to find the stale clients.

Against an in-process sandbox (default 10,000 seeded clients, two branches, ~12%
of them stale and ~15% of those with a future appointment), with the real Phorest
connector built from the sandbox's own config at syncd's default client-side limit
(20 requests/s): one :func:`syncd.retention.evaluate`, as ``syncd retention
--dry-run`` runs it. Prints one JSON object: wall time, Phorest calls in all (the
sandbox's own count and syncd's), client pages, and the appointment calls per
branch and window.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from syncd import config, engine, log, retention
from syncd.sandbox.app import Sandbox

SEED = 7
DEFAULT_RATE = 20.0  # [phorest] max_requests_per_second's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=0, help="the sandbox's default: 0")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help="Phorest requests/s syncd allows itself (default 20)")
    args = parser.parse_args()
    log.configure("warning", "json")
    os.environ["SYNCD_PHOREST__MAX_REQUESTS_PER_SECOND"] = str(args.rate)
    with tempfile.TemporaryDirectory() as tmp, Sandbox(
        clients=args.clients, seed=SEED, smtp_port=None, latency_ms=args.latency_ms
    ) as sandbox:
        result = _run(sandbox, Path(tmp), args)
    print(json.dumps(result, indent=2))


def _run(sandbox: Sandbox, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings = config.load(sandbox.write_config(tmp / "syncd.toml"))
    built, _keys = engine.build(settings, needed_by="the benchmark")
    sandbox.traffic.reset_counts()
    started = time.perf_counter()
    found = retention.evaluate(built["phorest"], settings, today=datetime.now(UTC).date())
    seconds = time.perf_counter() - started
    windows = [{"branch_id": w.branch_id, "from": w.first.isoformat(), "to": w.last.isoformat(),
                "calls": w.pages, "appointments": w.rows} for w in found.windows]  # fmt: skip
    appointment_calls = sum(w["calls"] for w in windows)
    return {
        "clients": args.clients, "live": found.live, "stale": len(found.stale),
        "kept_by_appointment": found.kept_by_appointment,
        "phorest_rate_per_second": settings.phorest.max_requests_per_second,
        "page_size": settings.phorest.page_size,
        "wall_seconds": round(seconds, 2),
        "phorest_calls": found.calls,
        "phorest_calls_seen_by_sandbox": sandbox.traffic.summary()["phorest"]["routes"],
        "client_pages": found.calls - appointment_calls - 1,
        "branch_calls": 1,
        "appointment_calls": appointment_calls,
        "appointment_calls_per_branch": {b: sum(w["calls"] for w in windows if w["branch_id"] == b)
                                         for b in dict.fromkeys(w["branch_id"] for w in windows)},
        "windows": windows,
        "guarded_at_default_5_percent": found.guarded,
    }  # fmt: skip


if __name__ == "__main__":
    main()
