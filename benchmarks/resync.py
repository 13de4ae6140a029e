"""Full resync at scale: syncd's API calls and time against their floors.

For each size (``--clients``, default 10,000 and 100,000; as many members as
clients unless ``--members`` says otherwise), a sandbox (drift 0.2, latency
injected on every vendor request) runs in this process and syncd in a spawned
one: one real resync through :func:`syncd.engine.resync` with the real
connectors built from the sandbox's own config, then a second resync, which
should find nothing to change (the no-change resync time).

Reported per size, as a table on stdout (``--json PATH`` also writes every figure):

- the lower bound L = ceil(clients/page_size) + ceil(members/1000)
  + ceil(Mailchimp writes/500) + Phorest writes (Phorest has no bulk write:
  one call each), the API calls syncd made to those two and their ratio to L;
  Google Analytics erasures (one call each, within a daily quota that defers
  the rest) are shown apart;
- the wall-time floor the configured Phorest rate implies, (Phorest calls in L)
  / (configured requests per second), and the resync's wall time over it; also
  the rate-cap time of the Phorest calls actually made;
- the no-change resync: its wall time and calls;
- syncd's peak RSS: the spawned process's own ``VmHWM`` from /proc. Not
  ``ru_maxrss``: a child started from this process inherits the parent's
  high-water mark in ``ru_maxrss`` (the fork before exec maps the whole sandbox),
  so it would report the sandbox's memory, not syncd's. ``VmHWM`` starts again
  at exec. Read once after the first resync and again at the end. The child
  runs with ``MALLOC_ARENA_MAX=2``, as the systemd unit runs syncd;
- the one-subject-at-a-time baseline, in the same run: on a fresh sandbox with
  the same seed, the same changes made the way per-subject tools make them (for
  each subject that needs a change, one GET of the record per system and one
  write per action, over plain HTTP). Only a sample of subjects is done for
  real; the count is extrapolated to every subject that needed a change, and
  "calls vs one at a time" is that count over syncd's calls. Both sides count
  Phorest and Mailchimp only: Google Analytics takes one call per erasure
  either way (and its daily quota defers syncd's).

Phorest is scanned at its maximum page size (200) and syncd's client-side limit
raised to 90 requests/s (Phorest allows 100) through ``SYNCD_PHOREST__*``
environment overrides; the emulator keeps its own 100 requests/s limit. The
plan the baseline replays goes from syncd's process to a file in a temporary
directory (removed at the end), so it does not weigh on syncd's memory. Figures
only: no identifier is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import sys
import tempfile
import time
from collections import defaultdict
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
    parser.add_argument("--clients", type=int, nargs="+", default=[10_000, 100_000],
                        help="one run per size")
    parser.add_argument("--members", type=int, default=None,
                        help="Mailchimp members (default: as many as clients)")
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--sample", type=int, default=2_000,
                        help="subjects the per-subject baseline changes for real")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args()
    log.configure("warning", "json")
    os.environ["SYNCD_PHOREST__PAGE_SIZE"] = str(PHOREST_PAGE_SIZE)
    os.environ["SYNCD_PHOREST__MAX_REQUESTS_PER_SECOND"] = str(PHOREST_REQUESTS_PER_SECOND)

    runs = []
    for clients in args.clients:
        members = args.members if args.members is not None else clients
        _stage(f"{clients:,} clients, {members:,} members")
        with tempfile.TemporaryDirectory() as tmp:
            syncd_run, planned = _syncd(clients, members, args.latency_ms, Path(tmp))
        baseline = _per_subject(clients, members, args.latency_ms, args.sample, planned)
        del planned
        syncd_calls = sum(syncd_run["api_calls"].get(v, {}).get("total", 0)
                          for v in ("phorest", "mailchimp"))
        runs.append({
            "clients": clients,
            "members": members,
            "drift": DRIFT,
            "latency_ms": args.latency_ms,
            "phorest_page_size": PHOREST_PAGE_SIZE,
            "syncd": syncd_run,
            "per_subject": {
                **baseline,
                "ratio_to_syncd": round(baseline["calls_extrapolated"] / max(1, syncd_calls), 2),
            },
        })
        if args.json:  # after each size, so a long run cut short keeps what it measured
            args.json.write_text(json.dumps(runs, indent=2) + "\n")
    _print(runs)


def _syncd(clients: int, members: int, latency_ms: float,
           tmp: Path) -> tuple[dict[str, Any], list[Planned]]:
    """Two real resyncs in a spawned process; the first one's plan is kept for the baseline."""
    started = time.perf_counter()
    sandbox = Sandbox(clients=clients, members=members, seed=SEED, smtp_port=None,
                      latency_ms=latency_ms, drift=DRIFT)
    seed_seconds = time.perf_counter() - started
    plan_path = tmp / "plan.pickle"
    with sandbox:
        config_path = sandbox.write_config(tmp / "syncd.toml", ledger_path=tmp / "ledger.sqlite3")
        settings = config.load(config_path)
        rate = float(settings.phorest.max_requests_per_second)
        page_size = int(settings.phorest.page_size)
        sandbox_peak_mb = _vm_hwm_mb("self")
        sandbox.traffic.reset_counts()
        # syncd runs in a process of its own (spawned: a fresh interpreter), which
        # reports its own VmHWM; the sandbox's memory is not in it.
        context = multiprocessing.get_context("spawn")
        # As the systemd unit runs syncd (Environment=MALLOC_ARENA_MAX=2); glibc reads
        # it when the spawned interpreter starts. Restored once the child has started.
        arenas = os.environ.get("MALLOC_ARENA_MAX")
        os.environ["MALLOC_ARENA_MAX"] = "2"
        results, go = context.Queue(), context.Queue()  # one direction each
        child = context.Process(target=_child,
                                args=(str(config_path), str(plan_path), results, go))
        child.start()
        if arenas is None:
            del os.environ["MALLOC_ARENA_MAX"]
        else:
            os.environ["MALLOC_ARENA_MAX"] = arenas
        first = results.get()
        calls = _calls(sandbox.traffic.summary())
        sandbox.traffic.reset_counts()
        go.put(True)  # the second resync starts with the counts at zero
        second = results.get()
        second_calls = _calls(sandbox.traffic.summary())
        child.join()
    ledger_mb = round(sum(f.stat().st_size for f in tmp.glob("ledger.sqlite3*")) / 1e6, 1)
    planned: list[Planned] = []
    with plan_path.open("rb") as f:
        while True:
            try:
                planned.extend(pickle.load(f))
            except EOFError:
                break
    writes: dict[str, int] = defaultdict(int)
    for (processor, _action, _rule, _why), n in first["counts"].items():
        writes[processor] += n
    by_action: dict[str, int] = defaultdict(int)
    for (processor, action, _rule, _why), n in first["counts"].items():
        by_action[f"{processor} {action}"] += n
    phorest_bound = math.ceil(first["clients"] / page_size) + writes["phorest"]
    # The bound covers the two systems syncd reads. Google Analytics (one
    # call per erasure, within a daily quota that defers the rest) is reported apart.
    bound = (phorest_bound + math.ceil(first["members"] / MEMBER_PAGE)
             + math.ceil(writes["mailchimp"] / BATCH_MEMBERS))
    read_systems_calls = sum(calls.get(v, {}).get("total", 0) for v in ("phorest", "mailchimp"))
    floor = phorest_bound / rate
    phorest_calls = calls.get("phorest", {}).get("total", 0)
    report = {
        "seed_seconds": round(seed_seconds, 2),
        "clients_read": first["clients"],
        "members_read": first["members"],
        "writes_planned": first["planned"],
        "writes_by_processor": dict(writes),
        "planned_by_action": dict(by_action),
        "outcomes": first["outcomes"],
        "failed": first["failed"],
        "unfinished": first["unfinished"],
        "api_calls": calls,
        "lower_bound_L": bound,
        "lower_bound_phorest_calls": phorest_bound,
        "calls_over_L": round(read_systems_calls / max(1, bound), 3),
        "phorest_rps": rate,
        "phorest_floor_seconds": round(floor, 2),
        "phorest_calls_at_rate_seconds": round(phorest_calls / rate, 2),
        "wall_seconds": round(first["wall"], 2),
        "wall_over_floor": round(first["wall"] / max(floor, 1e-9), 2),
        "sandbox_process_peak_rss_mb": sandbox_peak_mb,
        "ledger_mb": ledger_mb,
        "syncd_peak_rss_mb_first_resync": first["peak_rss_mb"],
        "syncd_peak_rss_mb": second["peak_rss_mb"],
        "second_resync": {
            "planned": second["planned"],
            "api_calls": second_calls["total"],
            "wall_seconds": round(second["wall"], 2),
        },
    }
    return report, planned


def _child(config_path: str, plan_path: str, results: Any, go: Any) -> None:
    """In a spawned process: a resync, then (when told) a second one; sends figures only."""
    log.configure("warning", "json")
    settings = config.load(config_path)
    built, keys = engine.build(settings, needed_by="the benchmark")
    enqueue = engine.enqueue
    with open(plan_path, "ab") as plan:  # noqa: PTH123

        def recording_enqueue(ledger: Ledger, planned: list[Planned]) -> list[int]:
            # Written as it comes, not kept: the baseline's copy must not weigh on syncd.
            pickle.dump(list(planned), plan)
            return enqueue(ledger, planned)

        engine.enqueue = recording_enqueue  # type: ignore[assignment]
        with Ledger.open(settings.ledger.path) as ledger:
            t0 = time.perf_counter()
            first = engine.resync(settings, ledger, built, keys, progress=_progress(t0))
            wall = time.perf_counter() - t0
        engine.enqueue = enqueue  # type: ignore[assignment]
    results.put(_figures(first, wall))
    del first
    go.get()  # the benchmark has read and reset the request counts
    with Ledger.open(settings.ledger.path) as ledger:
        t0 = time.perf_counter()
        second = engine.resync(settings, ledger, built, keys)
        wall = time.perf_counter() - t0
    results.put(_figures(second, wall))


def _figures(result: engine.ResyncResult, wall: float) -> dict[str, Any]:
    return {
        "clients": result.clients,
        "members": result.members,
        "planned": result.planned,
        "counts": dict(result.counts),
        "outcomes": result.report.counts if result.report else None,
        "failed": result.failed,
        "unfinished": result.unfinished,
        "wall": wall,
        "peak_rss_mb": _vm_hwm_mb("self"),
    }


def _per_subject(clients: int, members: int, latency_ms: float, sample_size: int,
                 planned: list[Planned]) -> dict[str, Any]:
    """The same changes, one subject at a time: GET the record, then write it."""
    by_subject: dict[str, list[Planned]] = defaultdict(list)
    for item in planned:
        # Google Analytics has no bulk call: one per erasure either way (and syncd's
        # are capped by GA's daily quota), so the comparison leaves it out on both sides.
        if item.processor in ("phorest", "mailchimp"):
            by_subject[item.action.subject_key].append(item)
    # Per subject: one GET per system it touches, one write per action.
    full = sum(len({p.processor for p in items}) + len(items) for items in by_subject.values())
    subjects = sorted(by_subject)
    sample = random.Random(SEED).sample(subjects, min(sample_size, len(subjects)))

    sandbox = Sandbox(clients=clients, members=members, seed=SEED, smtp_port=None,
                      latency_ms=latency_ms, drift=DRIFT)
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
        "actions": sum(len(items) for items in by_subject.values()),
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
        # Planning reports every batch (total None) and once more when done (total set).
        done = stage == "planned" and total is not None
        if done or count - last.get(stage, 0) >= 20_000 or count == 0:
            last[stage] = count
            print(f"{time.perf_counter() - t0:8.1f}s {stage}: {count}", file=sys.stderr, flush=True)

    return report


def _vm_hwm_mb(pid: int | str) -> float:
    """A process's own peak RSS (``VmHWM``, kB in /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def _print(runs: list[dict[str, Any]]) -> None:
    """One column per size: the bound and its ratio, the floors, memory, the baseline."""
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: Any) -> None:
        rows.append((name, [cell(r["syncd"], r["per_subject"]) for r in runs]))

    row("clients / members", lambda s, b: f"{s['clients_read']:,} / {s['members_read']:,}")
    row("writes: Phorest / Mailchimp / GA", lambda s, b: "{:,} / {:,} / {:,}".format(
        *(s["writes_by_processor"].get(p, 0) for p in ("phorest", "mailchimp", "google_analytics"))))
    row("bound L (calls)", lambda s, b: f"{s['lower_bound_L']:,}")
    row("API calls: Phorest / Mailchimp / Google", lambda s, b: "{:,} / {:,} / {:,}".format(
        *(s["api_calls"].get(v, {}).get("total", 0) for v in ("phorest", "mailchimp", "google"))))
    row("API calls (total)", lambda s, b: f"{s['api_calls']['total']:,}")
    row("calls / L (Phorest and Mailchimp calls)", lambda s, b: f"{s['calls_over_L']:.3f}x")
    row("GA erasures planned / calls made", lambda s, b: "{:,} / {:,}".format(
        s["writes_by_processor"].get("google_analytics", 0),
        s["api_calls"].get("google", {}).get("total", 0)))
    row("Phorest rate (req/s)", lambda s, b: f"{s['phorest_rps']:g}")
    row("wall-time floor (L's Phorest calls / rate)",
        lambda s, b: f"{s['phorest_floor_seconds']:.1f} s")
    row("Phorest calls made / rate", lambda s, b: f"{s['phorest_calls_at_rate_seconds']:.1f} s")
    row("resync wall time", lambda s, b: f"{s['wall_seconds']:.1f} s")
    row("wall time / floor", lambda s, b: f"{s['wall_over_floor']:.2f}x")
    row("no-change resync: wall time", lambda s, b: f"{s['second_resync']['wall_seconds']:.1f} s")
    row("no-change resync: planned / calls", lambda s, b: "{:,} / {:,}".format(
        s["second_resync"]["planned"], s["second_resync"]["api_calls"]))
    row("tasks failed / unfinished (e.g. GA's daily quota)",
        lambda s, b: f"{s['failed']:,} / {s.get('unfinished', 0):,}")
    row("syncd peak RSS (VmHWM)", lambda s, b: f"{s['syncd_peak_rss_mb']:.1f} MB")
    row("ledger on disk", lambda s, b: f"{s['ledger_mb']:.1f} MB")
    row("sandbox process peak RSS", lambda s, b: f"{s['sandbox_process_peak_rss_mb']:.1f} MB")
    row("one at a time: calls (extrapolated)", lambda s, b: "{:,} ({:,} sampled)".format(
        b["calls_extrapolated"], b["sampled_subjects"]))
    row("calls vs one at a time (Phorest and Mailchimp)",
        lambda s, b: f"{b['ratio_to_syncd']:.1f}x fewer")
    width = max(len(name) for name, _ in rows)
    cols = [max(len(cells[i]) for _, cells in rows) for i in range(len(runs))]
    latency = ", ".join(sorted({f"{r['latency_ms']:g} ms" for r in runs}))
    print(f"Full resync, drift {DRIFT:.0%}, latency {latency}, Phorest page size "
          f"{runs[0]['phorest_page_size'] if runs else PHOREST_PAGE_SIZE}")
    print("L = ceil(clients/page_size) + ceil(members/1000) + ceil(Mailchimp writes/500)"
          " + Phorest writes (no bulk write: one call each)")
    for name, cells in rows:
        print(f"  {name:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cols)))


def _stage(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
