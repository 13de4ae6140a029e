"""``syncd retention``: the retention purge (R4), by hand.

``--dry-run`` reads Phorest and lists who the purge would erase (Phorest client
ids and last-visit dates only), with totals and the API calls it took; it
writes nothing. Without it, each stale client becomes an erasure request; with
no daemon running the command then carries the work out itself (holding the
writer lock), otherwise the running daemon does. A run the purge guard holds
back erases nothing (exit 1); ``--confirm-run ID --count N`` lets it through.
"""

from __future__ import annotations

import argparse
import getpass
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from syncd.cli._common import EXIT_ERROR, EXIT_OK, Commands, load_settings
from syncd.errors import SyncdError


def add_parsers(commands: Commands, common: argparse.ArgumentParser) -> None:
    """Add ``syncd retention`` to the command line."""
    retention = commands.add_parser(
        "retention",
        help="erase clients with no visit for [policy] retention_months (R4)",
        description="The retention purge: every live client whose last visit and creation "
        "are older than [policy] retention_months, with no booked appointment within "
        "[policy] appointment_lookahead_days, gets an erasure request (as `syncd request "
        "erase` files). With no daemon running, the work is carried out now; otherwise the "
        "daemon does it. A run that would erase more than [policy] purge_guard_percent of "
        "the clients erases nothing and alerts the manager (exit 1) until confirmed with "
        "--confirm-run and --count.",
        parents=[common],
    )
    retention.add_argument("--dry-run", action="store_true",
                           help="list who would be erased (client ids, last visits); change "
                           "nothing")  # fmt: skip
    retention.add_argument("--json", action="store_true", help="print JSON")
    retention.add_argument("--confirm-run", type=_positive, metavar="ID",
                           help="let a run the purge guard held back go ahead")
    retention.add_argument("--count", type=_count, metavar="N",
                           help="with --confirm-run: the number of clients the run showed")
    retention.add_argument("--by", metavar="NAME", help="who confirms (default: login name)")
    retention.set_defaults(handler=cmd_retention)


def cmd_retention(args: argparse.Namespace) -> int:
    """``syncd retention [--dry-run] [--json] [--confirm-run ID --count N]``."""
    from syncd import engine, retention, rights
    from syncd.ledger import Ledger
    from syncd.lock import AlreadyRunning, writer_ledger
    from syncd.retry import RetryPolicy
    from syncd.tasks import run_due

    if (args.confirm_run is None) != (args.count is None):
        raise SyncdError("--confirm-run and --count go together")
    if args.dry_run and args.confirm_run is not None:
        raise SyncdError("--dry-run cannot confirm a run")
    settings = load_settings(args, interactive=True)
    built, keys = engine.build(settings, needed_by="syncd retention")
    now = datetime.now(UTC)
    if args.dry_run:
        path = Path(settings.ledger.path)
        if path.exists():
            with Ledger.open(path) as ledger:
                evaluation = retention.evaluate(built["phorest"], settings, today=now.date(),
                                                ledger=ledger)
        else:
            evaluation = retention.evaluate(built["phorest"], settings, today=now.date())
        return _show_evaluation(evaluation.as_json(), args.json)

    confirm = (args.confirm_run, args.count) if args.confirm_run is not None else None
    by = args.by or _login()

    def purge(ledger: Any) -> Any:
        return retention.purge(ledger, settings, built, keys, now=datetime.now(UTC),
                               confirm=confirm, confirmed_by=by)

    carried_out = True
    try:
        with writer_ledger(settings.ledger.path) as ledger:
            result = purge(ledger)
            if result.request_ids:
                moment = datetime.now(UTC)
                run_due(ledger, built, RetryPolicy(), keys, now=moment)
                rights.advance(ledger, phorest=built["phorest"], now=moment)
            states = _states(ledger, result.request_ids)
    except AlreadyRunning:
        carried_out = False
        with Ledger.open(settings.ledger.path) as ledger:
            result = purge(ledger)
            states = _states(ledger, result.request_ids)
    found = result.evaluation
    shown = {"run_id": result.run_id, "outcome": result.outcome, **found.as_json(),
             "requests": [{"id": i, "state": states[i]} for i in result.request_ids]}
    del shown["clients"]  # the ids stay in the requests (see syncd requests)
    if args.json:
        print(json.dumps(shown, indent=2))
        return EXIT_ERROR if result.outcome == "guarded" else EXIT_OK
    if result.outcome == "guarded":
        print(f"retention run #{result.run_id} held back by the purge guard: it would erase "
              f"{len(found.stale)} of {found.live} live clients (more than "
              f"{found.guard_percent:g}%); nothing was erased and the manager was alerted.")
        print("Check the list with `syncd retention --dry-run`; if it is right: "
              f"syncd retention --confirm-run {result.run_id} --count {len(found.stale)}")
        return EXIT_ERROR
    done = sum(1 for s in states.values() if s == "done")
    print(f"retention run #{result.run_id} ({result.outcome}): {len(result.request_ids)} "
          f"erasure request(s) filed of {found.live} live clients (cut-off "
          f"{found.cutoff.isoformat()}; {found.kept_by_appointment} kept by a booking, "
          f"{found.already_requested} already requested); {done} complete, "
          f"{len(result.request_ids) - done} open; {found.calls} Phorest call(s) to find them")
    if not carried_out and result.request_ids:
        print("syncd run is running: it carries the requests out (see syncd requests)")
    return EXIT_OK


def _show_evaluation(shown: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps({"dry_run": True, **shown}, indent=2))
        return EXIT_OK
    for client in shown["clients"]:
        print(f"{client['client_id']}\t{client['last_visit'] or 'never'}")
    calls = shown["calls"]
    print(f"dry run: {shown['stale']} of {shown['live']} live clients would be erased "
          f"(no visit or creation since {shown['cutoff']}, no booking until "
          f"{shown['lookahead_until']}); {shown['kept_by_appointment']} kept by a booking, "
          f"{shown['already_requested']} already requested")
    print(f"Phorest calls: {calls['phorest']} ({calls['appointment_pages']} appointment "
          f"page(s) over {len(calls['windows'])} branch window(s))")
    if shown["guarded"]:
        print(f"the purge guard would hold this run back (more than {shown['guard_percent']:g}% "
              "of live clients)")
    print("nothing was changed")
    return EXIT_OK


def _states(ledger: Any, request_ids: tuple[int, ...]) -> dict[int, str]:
    states = {}
    for request_id in request_ids:
        request = ledger.request(request_id)
        states[request_id] = request.state if request is not None else "unknown"
    return states


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a run id: {text[:20]!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text[:20]!r}")
    return int(text)
