"""Console pages over real HTTP: bytes, server time and memory with 10,000 requests.

A real SQLite ledger is built with ``--requests`` data-subject requests (default
10,000), filed over the last two years through the ledger's own methods, one
transaction per batch: kinds erase, restrict, unrestrict and export; states open,
done and cancelled; each with the steps its kind opens (Mailchimp and GA task steps
with their tasks, Phorest's manual Forget step) and the audit entries filing,
task outcomes, confirmations and closing write. An in-process sandbox (loopback)
serves Phorest for the pages that read it (the retention dry run).

The console (:func:`syncd.console.create_app`) is served by the production server
(:func:`syncd.httpd.serve`) on 127.0.0.1 at a free port; one ``requests`` session
logs in as a manager (the CSRF token parsed from the login form) and requests each
page ``--rounds`` times one after another (``--retention-rounds`` for /retention),
keeping the connection alive. Server time is the time to the full response on
loopback. Prints a table per page: body bytes, p50 and p95 milliseconds, and the
process's peak RSS so far (its own ``VmHWM``; the ledger build and the
in-process sandbox included). Figures only: no identifiers.
"""

from __future__ import annotations

import argparse
import random
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.table import Table

from syncd import config, log, staff
from syncd.console import create_app
from syncd.httpd import serve
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox

SEED = 11
BATCH = 500  # requests per ledger transaction while building
MANAGER = "bench-manager"
KINDS = (("erase", 50), ("restrict", 20), ("unrestrict", 10), ("export", 20))
STATES = (("done", 75), ("cancelled", 8), ("open", 17))
HISTORY_DAYS = 730
_CSRF = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200, help="requests per page")
    parser.add_argument("--retention-rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1_000, help="sandbox Phorest clients")
    args = parser.parse_args()
    log.configure("warning", "json")
    with tempfile.TemporaryDirectory() as tmp, Sandbox(
        clients=args.clients, seed=SEED, smtp_port=None
    ) as sandbox:
        settings = config.load(sandbox.write_config(Path(tmp) / "syncd.toml"))
        password = secrets.token_urlsafe(18)
        t0 = time.perf_counter()
        built = _build(Path(settings.ledger.path), args.requests, password)
        _stage(f"ledger built in {time.perf_counter() - t0:.1f}s: {built['summary']}")
        app = create_app(lambda: settings)
        server = serve(app, "127.0.0.1", 0, name="bench-console")
        try:
            rows = _measure(f"http://127.0.0.1:{server.port}", password, built, args)
        finally:
            server.stop()
    _print(rows, args)


# -- the ledger ---------------------------------------------------------------------------


def _build(path: Path, count: int, password: str) -> dict[str, Any]:
    """Fill the ledger; returns an open erasure with steps and a summary of what was made."""
    rng = random.Random(SEED)
    start = datetime.now(UTC) - timedelta(days=HISTORY_DAYS)
    moment = [start]
    kinds: Counter[str] = Counter()
    states: Counter[str] = Counter()
    open_erasure = 0
    with Ledger.open(path, clock=lambda: moment[0]) as ledger:
        staff.add(ledger, MANAGER, "manager", password, by=None)
        for first in range(0, count, BATCH):
            with ledger.transaction():
                for n in range(first, min(count, first + BATCH)):
                    # Received in order over two years; open ones are the recent ones.
                    kind = _pick(rng, KINDS)
                    received = start + timedelta(days=HISTORY_DAYS * n / count,
                                                 seconds=rng.randrange(3600))
                    state = "open" if n >= count * (1 - _share(STATES, "open")) else (
                        "done" if rng.random() < 0.9 else "cancelled")
                    request_id, steps = _request(ledger, rng, moment, kind, state, received)
                    kinds[kind] += 1
                    states[state] += 1
                    if kind == "erase" and state == "open" and steps >= 3 and not open_erasure:
                        open_erasure = request_id
            _stage(f"built {min(count, first + BATCH)} requests")
        counts = {"requests": ledger.count_requests(), "open": len(ledger.open_requests()),
                  "open_steps": len(ledger.open_steps()),
                  "audit": len(ledger.find_audit())}  # fmt: skip
    summary = f"{counts}; kinds {dict(kinds)}; states {dict(states)}"
    return {"open_erasure": open_erasure, "summary": summary}


def _request(ledger: Ledger, rng: random.Random, moment: list[datetime], kind: str,
             state: str, received: datetime) -> tuple[int, int]:  # fmt: skip
    """One request with its steps, tasks and audit, as syncd would have written them."""
    moment[0] = received
    subject = secrets.token_hex(32)
    client_id = f"c{rng.randrange(10**9):09d}"
    due = received + timedelta(days=30)
    request_id = ledger.add_request(kind, subject, "client_id", due, filed_by=MANAGER,
                                    client_id=client_id)
    ledger.add_audit(subject, None, f"request_{kind}", "R3:request", "filed",
                     request_id=request_id, actor=MANAGER, detail="filed with client_id; "
                     "shared addresses kept: 0")
    steps: list[tuple[int, int | None, str, str]] = []  # (step, task, processor, kind)
    if kind in ("erase", "restrict"):
        processors = ["mailchimp", "google_analytics"] if kind == "erase" else ["mailchimp"]
        for processor in processors:
            task = ledger.add_task(subject, processor, kind, "R3", request_id=request_id)
            steps.append((ledger.add_step(request_id, processor, "task", task_id=task,
                                          client_id=client_id), task, processor, "task"))
        if kind == "erase":
            step = ledger.add_step(request_id, "phorest", "manual", client_id=client_id,
                                   instructions=f"In Phorest, open client {client_id} and "
                                   "use Forget")
            steps.append((step, None, "phorest", "manual"))
    # Time passes: hours to days for the work, then the outcome.
    for step, task, processor, step_kind in steps:
        moment[0] += timedelta(hours=rng.randrange(1, 72))
        if state == "open" and rng.random() < 0.5:
            if step_kind == "task" and rng.random() < 0.3:
                ledger.finish(task or 0, "failed", error="http_500 after retries")
                ledger.close_step(step, "failed", evidence="task failed: http_500")
            continue  # still waiting
        if state == "cancelled":
            if task:
                ledger.finish(task, "cancelled", error="request cancelled")
            ledger.close_step(step, "cancelled", evidence="request cancelled")
            continue
        if task:
            ledger.finish(task, "done", vendor_request_id=f"v-{rng.randrange(10**8)}")
            ledger.close_step(step, "done", evidence=f"task #{task} done")
        else:
            ledger.close_step(step, "done", confirmed_by=MANAGER, evidence="confirmed")
            ledger.add_audit(subject, processor, "request_step_confirmed", "R3:request",
                             "done", request_id=request_id, actor=MANAGER,
                             detail=f"{processor} step confirmed")
    moment[0] += timedelta(hours=rng.randrange(1, 24))
    if state == "done":
        ledger.add_audit(subject, None, f"request_{kind}", "R3:request", "done",
                         request_id=request_id, detail="every processor done")
        ledger.close_request(request_id, "done")
    elif state == "cancelled":
        ledger.add_audit(subject, None, "request_cancelled", "R3:request", "done",
                         request_id=request_id, actor=MANAGER, detail="filed in error")
        ledger.close_request(request_id, "cancelled", note="filed in error")
    return request_id, len(steps)


def _pick(rng: random.Random, weighted: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([k for k, _ in weighted], [w for _, w in weighted])[0]


def _share(weighted: tuple[tuple[str, int], ...], name: str) -> float:
    return dict(weighted)[name] / sum(w for _, w in weighted)


# -- the pages ----------------------------------------------------------------------------


def _measure(base: str, password: str, built: dict[str, Any],
             args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    session = requests.Session()
    token = _token(session.get(f"{base}/login", timeout=30).text)
    answer = session.post(f"{base}/login", data={"csrf_token": token, "name": MANAGER,
                                                  "password": password}, timeout=30)
    if answer.status_code != 200 or answer.url.rstrip("/") != base:
        raise SystemExit(f"login failed: {answer.status_code}")
    token = _token(session.get(f"{base}/audit", timeout=30).text)
    open_erasure = built["open_erasure"]
    get = lambda path: lambda: session.get(base + path, timeout=60)  # noqa: E731
    pages: list[tuple[str, Callable[[], requests.Response], int]] = [
        ("/", get("/"), args.rounds),
        ("/requests", get("/requests"), args.rounds),
        ("/requests?all=1", get("/requests?all=1"), args.rounds),
        ("/requests?all=1&page=100", get("/requests?all=1&page=100"), args.rounds),
        ("/requests/<open erasure>", get(f"/requests/{open_erasure}"), args.rounds),
        ("/steps", get("/steps"), args.rounds),
        ("/retention", get("/retention"), args.retention_rounds),
        ("/audit", get("/audit"), args.rounds),
        ("/audit POST (request id)", lambda: session.post(
            f"{base}/audit", data={"csrf_token": token, "lookup": "request",
                                   "value": str(open_erasure)}, timeout=60), args.rounds),
        ("/users", get("/users"), args.rounds),
        ("/login", get("/login"), args.rounds),
    ]
    rows = []
    for name, call, rounds in pages:
        times, sizes = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            response = call()
            body = response.content
            times.append(time.perf_counter() - t0)
            if response.status_code != 200 or response.history:
                raise SystemExit(f"{name}: HTTP {response.status_code}")
            sizes.append(len(body))
        times.sort()
        rows.append({"page": name, "rounds": rounds, "bytes": int(statistics.median(sizes)),
                     "p50_ms": 1000 * times[len(times) // 2],
                     "p95_ms": 1000 * times[min(len(times) - 1, int(len(times) * 0.95))],
                     "peak_rss_mib": _peak_rss_mib()})  # fmt: skip
        _stage(f"{name}: p95 {rows[-1]['p95_ms']:.1f} ms")
    return rows


def _token(html: str) -> str:
    found = _CSRF.search(html)
    if found is None:
        raise SystemExit("no CSRF token in the form")
    return found.group(1)


def _peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: the latter also counts the fork this process was exec'd from.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _print(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = Table(title=f"Console pages, {args.requests:,} requests in the ledger "
                  "(loopback, one client, keep-alive)")
    for column in ("page", "rounds", "bytes", "p50 ms", "p95 ms", "peak RSS MiB"):
        table.add_column(column, justify="left" if column == "page" else "right")
    for r in rows:
        table.add_row(r["page"], str(r["rounds"]), f"{r['bytes']:,}", f"{r['p50_ms']:.1f}",
                      f"{r['p95_ms']:.1f}", f"{r['peak_rss_mib']:.0f}")
    Console(width=110).print(table)


def _stage(text: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
