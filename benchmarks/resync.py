"""Full resync at scale: syncd's API calls against a per-subject baseline.

Against a sandbox of 100,000 clients and 100,000 members (drift 0.2, latency
injected on every vendor request), runs one real ``syncd`` resync through
:func:`syncd.engine.resync` with the real connectors built from the sandbox's
own config, then a second resync (which should plan nothing). Prints JSON: API
calls by vendor, writes planned, the lower bound
L = ceil(clients/page_size) + ceil(members/1000) + ceil(writes/500), calls/L,
wall time and peak RSS. The sandbox runs in this process and syncd's first
resync in a spawned one, so the peak RSS reported is syncd's own.

Then, on a fresh sandbox with the same seed, the same changes are made the way
per-subject tools make them: for each subject that needs a change, one GET of
the record and one write per action, over plain HTTP. Only a sample of subjects
is done for real; the count is extrapolated to every subject that needed a change.

Phorest is scanned at its maximum page size (200) and syncd's client-side limit
raised to 90 requests/s (Phorest allows 100) through ``SYNCD_PHOREST__*``
environment overrides; the emulator keeps its own 100 requests/s limit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import requests

from syncd import config, engine, log
from syncd.ledger import Ledger
from syncd.reconcile import Planned
from syncd.sandbox.app import PHOREST_PREFIX, Sandbox

PHOREST_PAGE_SIZE = 200
PHOREST_REQUESTS_PER_SECOND = 90
MEMBER_PAGE = 1000
BATCH_MEMBERS = 500
DRIFT = 0.2
SEED = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--sample", type=int, default=2_000,
                        help="subjects the per-subject baseline changes for real")
    args = parser.parse_args()
    log.configure("warning", "json")
    os.environ["SYNCD_PHOREST__PAGE_SIZE"] = str(PHOREST_PAGE_SIZE)
    os.environ["SYNCD_PHOREST__MAX_REQUESTS_PER_SECOND"] = str(PHOREST_REQUESTS_PER_SECOND)

    with tempfile.TemporaryDirectory() as tmp:
        syncd_run, planned = _syncd(args, Path(tmp))
    baseline = _per_subject(args, planned)
    syncd_calls = syncd_run["api_calls"]["total"]
    print(json.dumps({
        "clients": args.clients,
        "members": args.members,
        "drift": DRIFT,
        "latency_ms": args.latency_ms,
        "phorest_page_size": PHOREST_PAGE_SIZE,
        "phorest_rps": PHOREST_REQUESTS_PER_SECOND,
        "syncd": syncd_run,
        "per_subject": {
            **baseline,
            "ratio_to_syncd": round(baseline["calls_extrapolated"] / max(1, syncd_calls), 2),
        },
    }, indent=2))


def _syncd(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], list[Planned]]:
    """Two real resyncs through the engine; the first one's plan is kept for the baseline."""
    started = time.perf_counter()
    sandbox = Sandbox(clients=args.clients, members=args.members, seed=SEED, smtp_port=None,
                      latency_ms=args.latency_ms, drift=DRIFT)
    seed_seconds = time.perf_counter() - started
    with sandbox:
        config_path = sandbox.write_config(tmp / "syncd.toml", ledger_path=tmp / "ledger.sqlite3")
        settings = config.load(config_path)
        sandbox_rss_mb = _rss_mb()
        sandbox.traffic.reset_counts()
        # syncd runs in a process of its own, so its peak RSS is its own, not the sandbox's.
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        child = context.Process(target=_first_resync, args=(str(config_path), results))
        child.start()
        first, captured, wall, peak_rss_mb = results.get()
        child.join()
        calls = _calls(sandbox.traffic.summary())
        sandbox.traffic.reset_counts()
        built, keys = engine.build(settings, needed_by="the benchmark")
        with Ledger.open(settings.ledger.path) as ledger:
            t0 = time.perf_counter()
            second = engine.resync(settings, ledger, built, keys)
            second_wall = time.perf_counter() - t0
            second_calls = _calls(sandbox.traffic.summary())
    writes = first.planned
    bound = (math.ceil(first.clients / PHOREST_PAGE_SIZE) + math.ceil(first.members / MEMBER_PAGE)
             + math.ceil(writes / BATCH_MEMBERS))
    report = {
        "seed_seconds": round(seed_seconds, 2),
        "clients_read": first.clients,
        "members_read": first.members,
        "writes_planned": writes,
        "planned_by_action": dict(Counter(f"{p.processor} {p.action.kind}" for p in captured)),
        "outcomes": first.report.counts if first.report else None,
        "failed": first.failed,
        "api_calls": calls,
        "lower_bound_L": bound,
        "calls_over_L": round(calls["total"] / max(1, bound), 3),
        "wall_seconds": round(wall, 2),
        "sandbox_process_rss_mb": sandbox_rss_mb,
        "syncd_process_peak_rss_mb": peak_rss_mb,
        "second_resync": {
            "planned": second.planned,
            "api_calls": second_calls["total"],
            "wall_seconds": round(second_wall, 2),
        },
    }
    return report, captured


def _first_resync(config_path: str, results: Any) -> None:
    """In a spawned process: one resync; sends (result, plan, wall seconds, peak RSS MB)."""
    log.configure("warning", "json")
    settings = config.load(config_path)
    built, keys = engine.build(settings, needed_by="the benchmark")
    captured: list[Planned] = []
    enqueue = engine.enqueue

    def recording_enqueue(ledger: Ledger, planned: list[Planned]) -> list[int]:
        captured.extend(planned)
        return enqueue(ledger, planned)

    engine.enqueue = recording_enqueue  # type: ignore[assignment]
    with Ledger.open(settings.ledger.path) as ledger:
        t0 = time.perf_counter()
        first = engine.resync(settings, ledger, built, keys, progress=_progress(t0))
        wall = time.perf_counter() - t0
    results.put((first, captured, wall, _rss_mb()))


def _per_subject(args: argparse.Namespace, planned: list[Planned]) -> dict[str, Any]:
    """The same changes, one subject at a time: GET the record, then write it."""
    by_subject: dict[str, list[Planned]] = defaultdict(list)
    for item in planned:
        by_subject[item.action.subject_key].append(item)
    # Per subject: one GET per system it touches, one write per action.
    full = sum(len({p.processor for p in items}) + len(items) for items in by_subject.values())
    subjects = sorted(by_subject)
    sample = random.Random(SEED).sample(subjects, min(args.sample, len(subjects)))

    sandbox = Sandbox(clients=args.clients, members=args.members, seed=SEED, smtp_port=None,
                      latency_ms=args.latency_ms, drift=DRIFT)
    c = sandbox.credentials
    with sandbox:
        base = sandbox.base_url
        phorest = requests.Session()
        phorest.auth = (c.phorest_username, c.phorest_password)
        mailchimp = requests.Session()
        mailchimp.auth = ("anystring", c.mailchimp_api_key)
        client_url = f"{base}{PHOREST_PREFIX}/api/business/{c.phorest_business_id}/client/"
        member_url = f"{base}/3.0/lists/{c.mailchimp_list_id}/members/"
        sandbox.traffic.reset_counts()
        phorest_sent, t0 = 0, time.perf_counter()

        def phorest_call(method: str, client_id: str, **kw: Any) -> requests.Response:
            # Stay under Phorest's 100 requests/s, as syncd does.
            nonlocal phorest_sent
            time.sleep(max(0.0, t0 + phorest_sent / PHOREST_REQUESTS_PER_SECOND
                           - time.perf_counter()))
            phorest_sent += 1
            return phorest.request(method, client_url + client_id, timeout=30, **kw)

        for key in sample:
            items = by_subject[key]
            fetched: dict[str, Any] = {}
            for item in items:
                a = item.action
                if item.processor == "phorest":
                    if "phorest" not in fetched:
                        fetched["phorest"] = phorest_call("GET", a.client_id or "")
                    body = fetched["phorest"].json() if fetched["phorest"].ok else {}
                    phorest_call("PUT", a.client_id or "",
                                 json={**body, "emailMarketingConsent": False})
                    continue
                url = member_url + hashlib.md5((a.email or "").strip().lower().encode()).hexdigest()
                if "mailchimp" not in fetched:
                    fetched["mailchimp"] = mailchimp.get(url, timeout=30)
                names = {"FNAME": a.first_name, "LNAME": a.last_name}
                if a.kind == "subscribe":
                    mailchimp.put(url, timeout=30, json={
                        "email_address": (a.email or "").strip(), "status_if_new": "subscribed",
                        "status": "subscribed", "merge_fields": names})
                elif a.kind == "erase":
                    mailchimp.post(url + "/actions/delete-permanent", timeout=30)
                else:
                    body = {
                        "unsubscribe": {"status": "unsubscribed"},
                        "update_names": {"merge_fields": names},
                        "clear_extra_fields": {"merge_fields": dict.fromkeys(a.fields, "")},
                        "move_email": {"email_address": (a.new_email or "").strip()},
                    }[a.kind]
                    mailchimp.patch(url, timeout=30, json=body)
        wall = time.perf_counter() - t0
        calls = _calls(sandbox.traffic.summary())
    done = sum(len(by_subject[k]) for k in sample)
    per_subject_calls = calls["total"] / max(1, len(sample))
    return {
        "subjects_needing_change": len(subjects),
        "actions": len(planned),
        "sampled_subjects": len(sample),
        "sampled_actions": done,
        "sample_calls": calls,
        "sample_wall_seconds": round(wall, 2),
        "calls_extrapolated": round(per_subject_calls * len(subjects)),
        "calls_computed": full,
        "wall_seconds_extrapolated": round(wall / max(1, len(sample)) * len(subjects), 1),
        "method": (f"GET + write per action done for real on {len(sample)} random subjects "
                   "(one GET per system a subject touches), extrapolated to every subject "
                   "that needed a change; calls_computed is the same rule applied to the "
                   "whole plan without calling"),
    }


def _calls(summary: dict[str, Any]) -> dict[str, Any]:
    """Requests by vendor and route (status counts summed), plus a total."""
    out: dict[str, Any] = {"total": 0}
    for vendor, data in summary.items():
        routes = {route: sum(statuses.values()) for route, statuses in data["routes"].items()}
        non_2xx = sum(n for statuses in data["routes"].values()
                      for status, n in statuses.items() if not status.startswith("2"))
        out[vendor] = {"total": data["total"], "non_2xx": non_2xx, "routes": routes}
        out["total"] += data["total"]
    return out


def _progress(t0: float) -> Any:
    """Stage changes on stderr, so a run cut short still shows where the time went."""
    last: dict[str, int] = {}

    def report(stage: str, count: int, total: int | None) -> None:
        del total
        if stage == "planned" or count - last.get(stage, 0) >= 20_000 or count == 0:
            last[stage] = count
            print(f"{time.perf_counter() - t0:8.1f}s {stage}: {count}", file=sys.stderr, flush=True)

    return report


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    main()
