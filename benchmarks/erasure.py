"""Erasure throughput: 1,000 erasure requests carried out across every processor.

Against an in-process sandbox at its default latency (0 ms; ``--latency-ms``), with a
real SQLite ledger and the real connectors built from the sandbox's own config, after
a first resync of Phorest and Mailchimp (as the daemon's first start does; GA is left
out of it so that its R5 deletions of the seeded dead clients do not spend the day's
GA quota before the benchmark starts), three phases, each timed:

1. filing: ``--requests`` erasures by email, one after another, each the way
   ``syncd request erase --email`` files one beside a running daemon
   (:func:`syncd.rights.resolve`, :func:`syncd.engine.plan_addresses`,
   :func:`syncd.rights.file`, one transaction each; the CLI's process start-up is
   not counted);
2. task work: :func:`syncd.tasks.run_due` then :func:`syncd.rights.advance`, as the
   daemon's work loop runs them, until no task is due: Mailchimp's erasures
   (``POST /batches``), then GA's deletions, timed apart (the daemon runs them one
   after the other in the same way);
3. verification: Forget pressed in the sandbox for every client (not timed: a
   person's work), then one :func:`syncd.rights.advance` with Phorest, as the
   daemon's ``requests`` job runs it: one client read per Forget step.

GA is paced at the real default, ``writes_per_minute = 150`` (the sandbox's config
sets 6000, the emulator having no per-minute limit); ``--ga-writes-per-minute``
changes it, and the GA time at the real pace is then computed from the deletions
made. The emulator keeps Google's 500 deletions per property per day: the rest wait
(``quota_wait``) for the next Pacific midnight and their requests stay open, which
the output says. Phorest is read at syncd's default client-side limit (20 requests/s).
Prints one JSON object: wall time per phase, vendor calls per processor and phase
(the sandbox's own request counts), requests completed, GA deletions done and deferred.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from syncd import config, engine, log, rights
from syncd.ledger import Ledger
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox
from syncd.sandbox.google import DEFAULT_DAILY_DELETION_QUOTA
from syncd.tasks import run_due

SEED = 5
REAL_GA_WRITES_PER_MINUTE = 150  # [google_analytics] writes_per_minute's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000)
    parser.add_argument("--clients", type=int, default=2_500)
    parser.add_argument("--latency-ms", type=float, default=0, help="the sandbox's default: 0")
    parser.add_argument("--ga-writes-per-minute", type=float, default=REAL_GA_WRITES_PER_MINUTE)
    args = parser.parse_args()
    log.configure("warning", "json")
    # Environment beats the file: the sandbox config's 6000 a minute becomes the real pace.
    os.environ["SYNCD_GOOGLE_ANALYTICS__WRITES_PER_MINUTE"] = str(args.ga_writes_per_minute)
    with tempfile.TemporaryDirectory() as tmp, Sandbox(
        clients=args.clients, seed=SEED, smtp_port=None, latency_ms=args.latency_ms
    ) as sandbox:
        result = _run(args, sandbox, Path(tmp))
    print(json.dumps(result, indent=2))


def _run(args: argparse.Namespace, sandbox: Sandbox, tmp: Path) -> dict[str, Any]:
    settings = config.load(sandbox.write_config(tmp / "syncd.toml"))
    built, keys = engine.build(settings, needed_by="the benchmark")
    ga = built[engine.ANALYTICS]
    policy = RetryPolicy()
    now: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731
    with Ledger.open(settings.ledger.path) as ledger:
        t0 = time.perf_counter()
        readable = {name: built[name] for name in engine.PROCESSORS}
        engine.resync(settings, ledger, readable, keys, now=now(), policy=policy)
        setup_s = time.perf_counter() - t0
        targets = _erasable(sandbox, args.requests)
        _stage(f"setup (first resync) {setup_s:.1f}s; filing {len(targets)} erasures")

        sandbox.traffic.reset_counts()
        t0 = time.perf_counter()
        request_ids = []
        for n, client in enumerate(targets, 1):
            person = rights.resolve(built["phorest"], keys, email=client["email"])
            queue = engine.plan_addresses(ledger, built, keys, person.own_emails, person.holders)
            request_ids.append(rights.file(ledger, settings, keys, "erase", person, queue,
                                           filed_by="benchmark", now=now(), analytics=ga))
            if n % 200 == 0:
                _stage(f"filed {n}")
        filing_s = time.perf_counter() - t0
        filing_calls = _calls(sandbox)

        work: dict[str, Any] = {}
        for processor in ("mailchimp", engine.ANALYTICS):
            _stage(f"task work: {processor}")
            sandbox.traffic.reset_counts()
            t0 = time.perf_counter()
            report = run_due(ledger, {processor: built[processor]}, policy, keys, now=now())
            rights.advance(ledger, now=now())
            work[processor] = {"seconds": round(time.perf_counter() - t0, 2),
                               "outcomes": report.counts.get(processor, {}),
                               "calls": _calls(sandbox)}  # fmt: skip

        for client in targets:
            sandbox.phorest.forget(client["clientId"])
        _stage("verification")
        sandbox.traffic.reset_counts()
        t0 = time.perf_counter()
        verified = rights.advance(ledger, phorest=built["phorest"], now=now())
        verify_s = time.perf_counter() - t0
        verify_calls = _calls(sandbox)

        tasks = {p: {s: n for s, n in ledger.count_tasks_by_state(p).items() if n}
                 for p in ("mailchimp", engine.ANALYTICS)}  # fmt: skip
        ga_tasks = [t for r in request_ids for t in ledger.tasks_for_request(r)
                    if t.processor == engine.ANALYTICS]
        deferred = [t for t in ga_tasks if t.state == "pending"
                    and (t.last_error or "").startswith("quota_wait")]
        resumes_at = min((t.next_attempt_at for t in deferred), default=None)
        requests = [r for r in map(ledger.request, request_ids) if r is not None]
        states = Counter(r.state for r in requests)
        waiting_on = Counter(p for r in requests if r.state == "open"
                             for p, s in rights.processor_states(ledger.steps(r.id)).items()
                             if s != "done")  # fmt: skip

    ga_done = sum(t.state == "done" for t in ga_tasks)
    task_work_s = sum(w["seconds"] for w in work.values())
    ga_s = work[engine.ANALYTICS]["seconds"]
    real_pace_s = ga_done * 60 / REAL_GA_WRITES_PER_MINUTE
    return {
        "requests": len(request_ids),
        "clients": args.clients,
        "latency_ms": args.latency_ms,
        "ga_writes_per_minute": args.ga_writes_per_minute,
        "ga_daily_deletion_quota": DEFAULT_DAILY_DELETION_QUOTA,
        "phorest_max_requests_per_second": settings.phorest.max_requests_per_second,
        "setup_first_resync_s": round(setup_s, 2),
        "wall_s": {
            "filing": round(filing_s, 2),
            "task_work": round(task_work_s, 2),
            "task_work_mailchimp": work["mailchimp"]["seconds"],
            "task_work_google_analytics": ga_s,
            "phorest_verification": round(verify_s, 2),
            "total": round(filing_s + task_work_s + verify_s, 2),
        },
        "filing_ms_per_request": round(filing_s / max(1, len(request_ids)) * 1000, 1),
        "vendor_calls": {
            "filing": filing_calls,
            "task_work_mailchimp": work["mailchimp"]["calls"],
            "task_work_google_analytics": work[engine.ANALYTICS]["calls"],
            "phorest_verification": verify_calls,
        },
        "task_outcomes": {p: w["outcomes"] for p, w in work.items()},
        "tasks_by_state": tasks,
        "requests_by_state": dict(states),
        "open_requests_waiting_on": dict(waiting_on),
        "phorest_steps_verified": verified.verified,
        "requests_completed": len(verified.completed),
        "ga": {
            "deletions_done": ga_done,
            "deletions_deferred_by_daily_quota": len(deferred),
            "deletions_accepted_by_emulator": len(sandbox.google.deletions()),
            "deferred_resume_in_s": (round((resumes_at - datetime.now(UTC)).total_seconds())
                                     if resumes_at else None),
            "quota_days_for_all": math.ceil(len(ga_tasks) / DEFAULT_DAILY_DELETION_QUOTA),
            "seconds_at_real_pace_computed": round(real_pace_s, 1),
            "note": ("seconds_at_real_pace_computed = deletions_done x 60 / 150: the pacing "
                     "alone at the default writes_per_minute"),
        },
    }


def _erasable(sandbox: Sandbox, count: int) -> list[dict[str, Any]]:
    """Live clients alone at their address (and in Phorest) whose address has a member."""
    clients = sandbox.phorest.snapshot_clients()
    at_address = Counter(c["email"].strip().lower() for c in clients if c.get("email"))
    merged_into = {c["mergedToClientId"] for c in clients if c.get("mergedToClientId")}
    chosen = [c for c in clients
              if c.get("email") and at_address[c["email"].strip().lower()] == 1
              and not (c.get("archived") or c.get("deleted") or c.get("mergedToClientId"))
              and c["clientId"] not in merged_into and c.get("firstName") != "Anonymous"
              and (sandbox.mailchimp.member(c["email"]) or {}).get("status")
              not in (None, "archived")]  # fmt: skip
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} erasable clients; raise --clients")
    return chosen[:count]


def _calls(sandbox: Sandbox) -> dict[str, Any]:
    """The sandbox's request counts since the last reset: per vendor, total and by route."""
    out: dict[str, Any] = {}
    for vendor, data in sandbox.traffic.summary().items():
        routes = {route: sum(statuses.values()) for route, statuses in data["routes"].items()}
        non_2xx = sum(n for statuses in data["routes"].values()
                      for status, n in statuses.items() if not status.startswith("2"))
        out[vendor] = {"total": data["total"], "non_2xx": non_2xx, "routes": routes}
    return out


def _stage(text: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
