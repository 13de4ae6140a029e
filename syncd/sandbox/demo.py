"""``make demo``: syncd end to end against the sandbox, in about half a minute.

A newcomer's first command. In a temporary directory (removed at the end) it
starts two real processes, exactly as an operator would:

- ``syncd sandbox`` (emulated Phorest, Mailchimp, Google and SMTP on loopback,
  seeded with synthetic clients and a drifted audience) writing a config there;
- ``syncd run`` on that config, and waits for ``/healthz`` to answer 200 (its
  first poll is a full resync that repairs the seeded drift).

Then it plays six short scenes through the sandbox's control API and syncd's
own commands, the way real people change the world, and shows after each what
Phorest and Mailchimp hold for the person concerned, read through the vendors'
own HTTP APIs:

1. a client clicks "unsubscribe" in a Mailchimp email: the audience webhook
   reaches the daemon, which switches the client's Phorest marketing consent off;
2. staff record an opt-out in Phorest: the daemon's next poll unsubscribes the
   Mailchimp member;
3. someone adds a phone number to a subscriber in Mailchimp, bypassing syncd.
   The poll does not re-read a subscription syncd itself set up, so this drift
   waits for a full comparison: ``syncd resync``, run while the daemon runs,
   clears the field (Mailchimp receives name and email only, rule R1);
4. a client asks to be erased: ``syncd request erase --email …``, filed while
   the daemon runs, which deletes the Mailchimp member permanently and has GA
   delete the person's data (the sandbox logs the deletion); the request then
   waits on Phorest's "Client actions › Forget", which has no API. Staff press
   Forget in the sandbox, the daemon sees the client forgotten and completes
   the request, and a later ``syncd resync`` does not add the person back (the
   address is suppressed; Mailchimp would refuse it anyway);
5. the retention purge (R4): a client not seen for ``[policy] retention_months``
   books an appointment (sandbox action ``phorest-book``); ``syncd retention
   --dry-run`` lists the stale client ids and last visits with totals, leaving
   the booked client out; ``syncd retention`` is held back by the purge guard
   (the sandbox's world is about 12% stale, above ``purge_guard_percent``), the
   manager confirms with ``--confirm-run ID --count N``, and the daemon deletes
   every stale client's Mailchimp member while the booked client's stays;
6. the booked client asks for a copy of their data: ``syncd request export
   --client-id ID --output …/export.csv``; the demo shows the file's mode
   (0600) and its rows per processor, never its contents.

Last, the audit trail the ledger kept for those people, then the daemon is
stopped with SIGTERM (it must exit 0) and the sandbox with it.

The manager's web console is served by the daemon throughout: right after the
daemon starts, the demo creates a manager account for it (``syncd user add
demo-manager --role manager --password-file …``, with a password generated for
this run) and prints the console's address and that login, so the scenes can
be followed in a browser too. With ``--keep-running`` (``make demo
DEMO_ARGS=--keep-running``) the daemon and the sandbox keep running after the
scenes, the console browsable, until Ctrl-C (or SIGTERM), which stops them and
exits 0.

People are shown by Phorest client id and Mailchimp subscriber-hash prefix
only (an address on a command line shows as ``<email>``, as syncd's logs mask
it): no email, name or phone is ever printed, even synthetic ones. Any
failure prints one line and exits 1 with everything stopped; Ctrl-C stops
everything too (exit 130), except that it is how ``--keep-running`` ends.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import requests
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from syncd import config, engine, retention, rights
from syncd.ledger import Ledger
from syncd.log import redact_text
from syncd.web import WEBHOOK_PREFIX

DEFAULT_CLIENTS = 200
DEFAULT_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 15.0
NON_TERMINAL_WIDTH = 150
WAIT_STEP_SECONDS = 0.1
PHOREST_PAGE_SIZE = 200
NAME_FIELDS = ("FNAME", "LNAME")
# A made-up number in the UK drama range (07700 900xxx): never a real person's.
DRIFT_PHONE = "07700 900555"
# Who files the erasure request in scene 4 (a staff name, not the person's).
ERASURE_FILED_BY = "reception"
# Who confirms the retention run the purge guard held back in scene 5.
PURGE_CONFIRMED_BY = "manager"
# Stale client ids the retention scene shows from the dry run's list.
SHOWN_STALE = 3
# The console account the demo creates (its password is generated for each run).
DEMO_MANAGER = "demo-manager"
KEEP_RUNNING_CHECK_SECONDS = 0.5
# Environment the demo's own syncd processes must not inherit from the caller.
INHERITED_PREFIXES = ("SYNCD_",)
INHERITED_NAMES = ("CREDENTIALS_DIRECTORY",)


class DemoError(Exception):
    """A step failed; the message is one line for the user (no personal data)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every scene ended as it should, 1 on a failure, 130 on Ctrl-C.
    """
    args = _parser().parse_args(argv)
    # Not a terminal (CI, a pipe): wide enough that the audit table never wraps.
    console = Console(width=None if sys.stdout.isatty() else NON_TERMINAL_WIDTH, highlight=False)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="syncd-demo-") as tmp, _Processes() as processes:
            Demo(Path(tmp), args.clients, args.timeout, console, processes,
                 keep_running=args.keep_running).run()
    except DemoError as error:
        console.print(f"[bold red]demo failed:[/] {error}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] syncd and the sandbox are stopped, "
                      "the temporary directory is removed")
        return 130
    except Exception as error:  # a bug in the demo: still one line, still no personal data
        console.print(f"[bold red]demo failed:[/] internal error ({type(error).__name__}: "
                      f"{redact_text(str(error))[:200]})")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m syncd.sandbox.demo",
        description="Run syncd against the sandbox: a webhook opt-out, a Phorest opt-out, "
        "a resync, an erasure request, a retention purge and an export, with what each system "
        "holds and the audit trail.",
    )
    parser.add_argument("--clients", type=_count, default=DEFAULT_CLIENTS, metavar="N",
                        help=f"synthetic clients to seed (default: {DEFAULT_CLIENTS})")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_SECONDS,
                        metavar="SECONDS", help="longest wait for each outcome "
                        f"(default: {DEFAULT_TIMEOUT_SECONDS:g})")
    parser.add_argument("--keep-running", action="store_true",
                        help="after the scenes, keep syncd and the sandbox running (the web "
                        "console stays browsable) until Ctrl-C")
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 20:
        raise argparse.ArgumentTypeError("must be at least 20 (the demo needs six people)")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    # SIGTERM (e.g. a CI timeout) stops everything the way Ctrl-C does.
    raise KeyboardInterrupt


# -- the story ---------------------------------------------------------------------------


@dataclass
class Person:
    """One client the story follows. ``email`` is only ever sent, never printed."""

    label: str
    client_id: str
    email: str = field(repr=False)

    @property
    def member_hash(self) -> str:
        """Mailchimp's subscriber hash: md5 of the lower-cased address."""
        return hashlib.md5(self.email.strip().lower().encode()).hexdigest()

    @property
    def shown(self) -> str:
        """How the person is named on screen."""
        return f"{self.label} (Phorest client {self.client_id}, Mailchimp {self.member_hash[:8]}..)"


@dataclass(frozen=True)
class Holding:
    """What both systems hold for one person at one moment (no personal data)."""

    email_marketing: bool | None
    sms_marketing: bool | None
    email_reminders: bool | None
    sms_reminders: bool | None
    member_status: str
    extra_fields: tuple[str, ...]


class Demo:
    """The processes, the vendors' APIs and the six scenes.

    Args:
        tmp: the temporary directory (config, secrets, ledger, logs).
        clients: synthetic clients to seed.
        timeout: the longest wait for any one outcome, in seconds.
        console: where the story is told.
        processes: starts and stops the syncd processes.
        keep_running: after the scenes, wait for Ctrl-C before stopping everything.
    """

    def __init__(self, tmp: Path, clients: int, timeout: float, console: Console,
                 processes: _Processes, *, keep_running: bool = False) -> None:
        self.tmp, self.clients, self.timeout = tmp, clients, timeout
        self.keep_running = keep_running
        self.console_login = ""
        self.console, self.processes = console, processes
        self.config_path = tmp / "syncd.toml"
        self.http = requests.Session()
        self.settings: Any = None
        self.started = time.monotonic()

    def run(self) -> None:
        """Start, play the six scenes, show the audit trail, (wait for Ctrl-C,) stop.

        Raises:
            DemoError: a process or an outcome did not come as expected.
        """
        self.console.print(Panel.fit(
            "syncd keeps Mailchimp consistent with Phorest, the salon's system of record.\n"
            "This demo runs the sandbox (emulated Phorest, Mailchimp, Google, SMTP) and the\n"
            "syncd daemon as real processes, then makes people act. People are shown by\n"
            "Phorest client id and Mailchimp subscriber-hash prefix only.",
            title="syncd demo"))
        env = self._environment()
        with self.http:
            sandbox = self._start_sandbox(env)
            daemon = self._start_daemon(env)
            self._open_console(env)
            self._register_webhook()
            first, second, third, fourth = self._choose_people()
            self._scene_webhook(first)
            self._scene_phorest_opt_out(second)
            self._scene_resync(third, env)
            self._scene_erasure(fourth, env)
            booked = self._scene_retention(env)
            self._scene_export(booked, env)
            self._show_audit([first, second, third, fourth, booked])
            if self.keep_running:
                self._wait_for_ctrl_c()
        self._stop(daemon, sandbox)
        self.console.print(
            f"\n[bold green]Done[/] in {time.monotonic() - self.started:.1f} s: syncd stopped "
            "cleanly (exit 0), the sandbox stopped, the temporary directory is removed.")

    # -- starting ------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        """The caller's environment without syncd settings, plus a free daemon port."""
        for name in list(os.environ):
            if name.startswith(INHERITED_PREFIXES) or name in INHERITED_NAMES:
                del os.environ[name]  # also for config.load() in this process
        self.daemon_port = _free_port()
        os.environ["SYNCD_DAEMON__LISTEN"] = f"127.0.0.1:{self.daemon_port}"
        self.console_port = _free_port()
        os.environ["SYNCD_CONSOLE__LISTEN"] = f"127.0.0.1:{self.console_port}"
        return dict(os.environ)

    def _start_sandbox(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log_path = self.tmp / "sandbox.log"
        sandbox = self.processes.start(
            "syncd sandbox",
            [*_syncd(), "sandbox", "--clients", str(self.clients), "--port", "0",
             "--smtp-port", "0", "--latency-ms", "0", "--write-config", str(self.config_path)],
            log_path, env)
        self._wait(lambda: "Ctrl-C stops the sandbox" in _read(log_path), "the sandbox to start")
        self.settings = config.load(self.config_path)
        base = urlsplit(self.settings.phorest.base_url)
        self.sandbox_url = f"{base.scheme}://{base.netloc}"
        self._say(f"syncd sandbox --clients {self.clients} --port 0 --write-config "
                  f"{self.config_path}", f"emulators at {self.sandbox_url}, ledger "
                  f"{self.settings.ledger.path}")
        return sandbox

    def _start_daemon(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log_path = self.tmp / "daemon.log"
        started = time.monotonic()
        daemon = self.processes.start(
            "syncd run", [*_syncd(), "--config", str(self.config_path), "run"], log_path, env)
        self._wait(self._healthy,
                   "syncd run to answer 200 on /healthz (its first poll is a full resync)")
        self._say(f"syncd run --config {self.config_path}",
                  f"healthy on {self._daemon_url}/healthz after its first full resync "
                  f"({time.monotonic() - started:.1f} s)")
        return daemon

    def _open_console(self, env: dict[str, str]) -> None:
        """A manager account for the web console, and where to log in with it."""
        password = secrets.token_urlsafe(12)
        path = self.tmp / f"{DEMO_MANAGER}.password"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as fh:
            fh.write(password + "\n")
        self._syncd_command(["user", "add", DEMO_MANAGER, "--role", "manager",
                             "--password-file", str(path)], env)
        self._wait(self._console_answers, f"the web console at {self._console_url}")
        # A synthetic account of this run's throwaway ledger: its password is meant to be seen.
        self.console_login = f"log in as {DEMO_MANAGER}, password {password}"
        self.console.print(f"  Web console: {self._console_url}  ({self.console_login})")

    @property
    def _console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}/"

    def _console_answers(self) -> bool:
        try:
            response = self.http.get(f"{self._console_url}login", timeout=HTTP_TIMEOUT_SECONDS)
        except requests.RequestException:
            return False  # not listening yet
        return response.status_code == 200

    def _wait_for_ctrl_c(self) -> None:
        """Keep the daemon and the sandbox running until Ctrl-C (or SIGTERM).

        Raises:
            DemoError: one of them exited on its own.
        """
        self.console.print()
        self.console.print(Panel.fit(
            f"syncd and the sandbox keep running. Web console: {self._console_url}\n"
            f"{self.console_login[0].upper()}{self.console_login[1:]}.\n"
            "Ctrl-C stops syncd and the sandbox and removes the temporary directory.",
            title="--keep-running"))
        try:
            while True:
                for name, process, log_path in self.processes.running():
                    if process.poll() is not None:
                        raise DemoError(f"{name} exited {process.returncode}: "
                                        f"{_last_line(_read(log_path))}")
                time.sleep(KEEP_RUNNING_CHECK_SECONDS)
        except KeyboardInterrupt:
            self.console.print("Ctrl-C: stopping syncd and the sandbox.")

    @property
    def _daemon_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon_port}"

    def _register_webhook(self) -> None:
        secret = self.settings.mailchimp.webhook_secret.get_secret_value()
        self._act("mailchimp-register-webhook",
                  url=f"{self._daemon_url}{WEBHOOK_PREFIX}{secret}")
        self.console.print(f"  Mailchimp audience webhook -> {self._daemon_url}{WEBHOOK_PREFIX}***")

    def _choose_people(self) -> tuple[Person, Person, Person, Person]:
        """Four live clients with marketing consent, alone at their address, subscribed."""
        rows = list(self._phorest_clients())
        holders: dict[str, int] = {}
        for row in rows:
            if row.get("email"):
                holders[row["email"].lower()] = holders.get(row["email"].lower(), 0) + 1
        people: list[Person] = []
        for row in rows:
            email = row.get("email")
            if (not email or holders[email.lower()] > 1 or not row.get("emailMarketingConsent")
                    or row.get("archived") or row.get("deleted") or row.get("mergedToClientId")):
                continue
            person = Person("ABCD"[len(people)], row["clientId"], email)
            holding = self._holding(person)
            if holding.member_status == "subscribed" and not holding.extra_fields:
                people.append(person)
                if len(people) == 4:
                    return people[0], people[1], people[2], people[3]
        raise DemoError(f"found only {len(people)} consenting subscribed client(s) among "
                        f"{len(rows)}; run with more --clients")

    # -- the scenes ----------------------------------------------------------------------

    def _scene_webhook(self, person: Person) -> None:
        self._scene(1, "A client clicks 'unsubscribe' in a Mailchimp email", person,
                    "Mailchimp sends the audience webhook to syncd, which withdraws the "
                    "client's email-marketing consent in Phorest (R2: an opt-out anywhere wins).")
        before = self._holding(person)
        self._act("mailchimp-unsubscribe", email=person.email)
        took = self._wait(lambda: self._holding(person).email_marketing is False,
                          "Phorest email-marketing consent to turn off")
        self._show(person, before, f"consent off in Phorest {took:.1f} s after the click "
                   "(webhook -> ledger inbox -> Phorest PUT)")

    def _scene_phorest_opt_out(self, person: Person) -> None:
        self._scene(2, "Staff record an opt-out in Phorest", person,
                    "syncd polls Phorest's change feed (every "
                    f"{self.settings.phorest.poll_interval_seconds} s here) and unsubscribes the "
                    "Mailchimp member: no consent in Phorest, no marketing.")
        before = self._holding(person)
        self._act("phorest-consent", client_id=person.client_id, consent=False)
        took = self._wait(lambda: self._holding(person).member_status == "unsubscribed",
                          "the Mailchimp member to be unsubscribed")
        self._show(person, before, f"unsubscribed in Mailchimp {took:.1f} s after the "
                   "Phorest edit (the daemon's poll)")

    def _scene_resync(self, person: Person, env: dict[str, str]) -> None:
        self._scene(3, "Someone adds a phone number to a subscriber in Mailchimp", person,
                    "Done in Mailchimp, bypassing syncd. Mailchimp may hold name and email "
                    "only (R1). The poll does not re-read a subscription syncd set up itself; "
                    "a full comparison does: `syncd resync`, while the daemon runs.")
        before = self._holding(person)
        status = self._mailchimp("PATCH", person, json={"merge_fields": {"PHONE": DRIFT_PHONE}})
        if status != 200:
            raise DemoError(f"Mailchimp PATCH member answered {status}")
        drifted = self._holding(person)
        if "PHONE" not in drifted.extra_fields:
            raise DemoError("the phone number did not reach the Mailchimp member")
        polls = self._polls_ok()
        self._wait(lambda: self._polls_ok() > polls, "the daemon's next poll")
        if "PHONE" not in self._holding(person).extra_fields:
            raise DemoError("the poll cleared the field: this scene no longer shows a resync")
        self._show(person, before, "still there after the daemon's next poll", after=drifted)

        done = self._syncd_command(["resync"], env)
        self._panel("syncd resync", done)
        self._wait(lambda: not self._holding(person).extra_fields,
                   "the phone number to be cleared from Mailchimp")
        self._show(person, drifted, "resync fixed it: the extra merge field is cleared")

    def _scene_erasure(self, person: Person, env: dict[str, str]) -> None:
        poll = self.settings.phorest.poll_interval_seconds
        self._scene(4, "A client asks to be erased", person,
                    "Staff file the request with `syncd request erase` while the daemon runs "
                    "(R3). The daemon deletes the Mailchimp member permanently and has GA delete "
                    "the client's data; Phorest's 'Client actions › Forget' has no API, so that "
                    "step waits for staff, and the daemon closes it itself once Phorest shows "
                    f"the client forgotten (it looks every {poll} s here).")
        before = self._holding(person)
        started = time.monotonic()
        filed = self._syncd_command(
            ["request", "erase", "--email", person.email, "--by", ERASURE_FILED_BY], env,
            shown=f"request erase --email <email> --by {ERASURE_FILED_BY}")
        found = re.search(r"^request #(\d+) filed", filed.stdout, re.M)
        if not found:
            raise DemoError("`syncd request erase` did not say which request it filed")
        request_id = int(found.group(1))
        self._panel("syncd request erase", filed, keep=r"request #|syncd run is running")

        self._wait(lambda: all(self._request_steps(request_id).get(name) == "done"
                               for name in (rights.MAILCHIMP, rights.ANALYTICS)),
                   f"the Mailchimp and GA steps of request #{request_id}")
        waiting = self._holding(person)
        if not waiting.member_status.startswith("absent"):
            raise DemoError(f"request #{request_id}: the Mailchimp member is still "
                            f"{waiting.member_status}")
        deletion = self._ga_deletion(person)
        if deletion is None:
            raise DemoError(f"request #{request_id}: the GA emulator logged no deletion for "
                            f"client {person.client_id}")
        state, processors = self._request_state(request_id)
        if state != "open" or processors.get(rights.PHOREST) != "waiting":
            raise DemoError(f"request #{request_id} is {state} with Phorest "
                            f"{processors.get(rights.PHOREST, 'absent')}, not open and waiting "
                            "on the Forget step")
        self._show(person, before, "Mailchimp member deleted permanently "
                   f"{time.monotonic() - started:.1f} s after the command was run (the daemon's "
                   "work loop)", after=waiting)
        self.console.print(f"[green]OK[/] GA (the emulator's log): submitUserDeletion of "
                           f"{deletion['identifier_type']} = Phorest client {person.client_id}, "
                           f"deletionRequestTime {deletion['deletion_request_time']}")
        self.console.print(f"[green]OK[/] request #{request_id} is open: "
                           f"{_states(processors)}; it waits on the Phorest Forget step")
        self._panel(f"syncd request show {request_id}",
                    self._syncd_command(["request", "show", str(request_id)], env))

        self.console.print(f"Staff open Phorest client {person.client_id} and press "
                           f"{rights.PHOREST_FORGET} (sandbox action phorest-forget).")
        self._act("phorest-forget", client_id=person.client_id)
        took = self._wait(lambda: self._request_state(request_id)[0] == "done",
                          f"request #{request_id} to complete")
        forgotten = self._holding(person)
        self._show(person, waiting, f"request #{request_id} done {took:.1f} s after Forget: the "
                   "daemon read the client, saw it forgotten and closed the last step",
                   after=forgotten)

        done = self._syncd_command(["resync"], env)
        self._panel("syncd resync", done, keep=r"Nothing to do|\d+ action\(s\) planned")
        after = self._holding(person)
        if not after.member_status.startswith("absent"):
            raise DemoError(f"the resync re-added the erased person to Mailchimp "
                            f"({after.member_status})")
        written = self._mailchimp_writes_since_request(person, request_id)
        if written:
            raise DemoError(f"the resync wrote to Mailchimp for the erased person: "
                            f"{', '.join(written)}")
        self._show(person, forgotten, "the resync did not re-add the person: syncd wrote "
                   "nothing to Mailchimp for them. Their identifiers stay suppressed should the "
                   "address turn up again, and Mailchimp refuses a permanently deleted address "
                   "anyway", after=after)

    def _scene_retention(self, env: dict[str, str]) -> Person:
        """Scene 5; returns the stale client a booking kept (scene 6's person)."""
        policy = self.settings.policy
        cut = retention.cutoff(datetime.now(UTC).date(), policy.retention_months)
        old = self._old_people(cut)
        if len(old) < 2:
            raise DemoError(f"found {len(old)} client(s) not seen since {cut.isoformat()} with a "
                            "Mailchimp member; run with more --clients")
        booked, purged = old[0], old[1:]
        self._scene(5, "The retention purge: clients not seen for "
                    f"{policy.retention_months} months", booked,
                    "`syncd retention --dry-run` lists who the purge would erase (R4): no visit "
                    f"or creation since {cut.isoformat()}, no booking in the next "
                    f"{policy.appointment_lookahead_days} days. Then `syncd retention`, while the "
                    "daemon runs, files an erasure request per stale client and the daemon "
                    "carries them out; a run that would erase more than "
                    f"{policy.purge_guard_percent:g}% of the clients waits for a person to "
                    "confirm it. This client has not been seen either, but books an appointment.")
        before = self._holding(booked)
        self._act("phorest-book", client_id=booked.client_id, branch_id=self._branch_id())
        self.console.print(f"Phorest client {booked.client_id} books an appointment for next "
                           "week (sandbox action phorest-book).")

        dry = self._syncd_command(["retention", "--dry-run"], env)
        listed = dict(re.findall(r"^(\S+)\t(\S+)$", dry.stdout, re.M))
        self._panel("syncd retention --dry-run", dry,
                    keep=r"dry run:|Phorest calls|the purge guard|nothing was changed")
        examples = "; ".join(f"{client_id} (last visit {visit})"
                             for client_id, visit in list(listed.items())[:SHOWN_STALE])
        self.console.print(f"  it listed {len(listed)} client id(s) with last visits, e.g. "
                           f"{examples}")
        if booked.client_id in listed:
            raise DemoError(f"the dry run lists client {booked.client_id}, whose booking should "
                            "keep them")
        purged = [person for person in purged if person.client_id in listed]
        if not purged:
            raise DemoError("the dry run lists none of the stale clients with a Mailchimp member")

        started = time.monotonic()
        done = self._syncd_command(["retention"], env, codes=(0, 1))
        self._panel("syncd retention", done)
        held = re.search(r"--confirm-run (\d+) --count (\d+)", done.stdout)
        if done.returncode == 1:
            if not held:
                raise DemoError("`syncd retention` exited 1 without naming a run to confirm")
            self.console.print(f"The manager checks the list and confirms run #{held.group(1)}.")
            done = self._syncd_command(["retention", "--confirm-run", held.group(1), "--count",
                                        held.group(2), "--by", PURGE_CONFIRMED_BY], env)
            self._panel("syncd retention --confirm-run", done)
        filed = re.search(r"(\d+) erasure request\(s\) filed", done.stdout)
        if not filed or int(filed.group(1)) != len(listed):
            raise DemoError(f"`syncd retention` did not file the {len(listed)} request(s) the "
                            "dry run listed")
        self._wait(lambda: all(self._member(person)[1] is None for person in purged),
                   "the stale clients' Mailchimp members to be deleted")
        took = time.monotonic() - started
        after = self._holding(booked)
        if after.member_status.startswith("absent"):
            raise DemoError(f"the purge deleted the Mailchimp member of client "
                            f"{booked.client_id}, whose booking should keep them")
        self.console.print(f"[green]OK[/] {len(purged)} of {len(purged)} stale clients' Mailchimp "
                           f"members deleted {took:.1f} s after the run (the daemon's work "
                           "loop); their requests wait on Phorest's Forget, like scene 4's")
        self._show(person=booked, before=before, outcome="the booked client was left alone: "
                   "still in Phorest and in Mailchimp", after=after)
        return booked

    def _scene_export(self, person: Person, env: dict[str, str]) -> None:
        self._scene(6, "A client asks for a copy of their data", person,
                    "`syncd request export` reads what every processor holds, live, and writes "
                    "it to a file only its owner can read (R8). The demo shows the file's mode "
                    "and rows per processor, never its contents.")
        path = self.tmp / "export.csv"
        done = self._syncd_command(["request", "export", "--client-id", person.client_id,
                                    "--output", str(path), "--by", ERASURE_FILED_BY], env)
        self._panel("syncd request export", done, keep=r"request #")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != 0o600:
            raise DemoError(f"the export file has mode {mode:04o}, not 0600")
        with path.open(newline="") as file:
            reader = csv.reader(file)
            column = next(reader).index("processor")
            rows = Counter(row[column] for row in reader)
        table = Table(title=f"{path.name}: rows per processor", title_justify="left")
        table.add_column("processor")
        table.add_column("rows", justify="right")
        for processor, count in sorted(rows.items()):
            table.add_row(processor, str(count))
        self.console.print(table)
        if not rows.get(rights.PHOREST) or not rows.get(rights.MAILCHIMP):
            raise DemoError("the export holds no Phorest or no Mailchimp row")
        self.console.print(f"[green]OK[/] export written with mode {mode:04o}: "
                           f"{sum(rows.values())} row(s) from {len(rows)} processor(s)")

    def _show_audit(self, people: Sequence[Person]) -> None:
        keys = engine.subject_keys(self.settings)
        rows = []
        with Ledger.open(self.settings.ledger.path) as ledger:
            for person in people:
                rows.extend((event, person)
                            for event in ledger.audit_events(keys.client_id(person.client_id)))
        table = Table(title="Audit trail in the ledger (subject keys are HMACs; no personal data)")
        for name in ("person", "time (UTC)", "processor", "action", "reason", "outcome",
                     "vendor request id"):
            table.add_column(name, overflow="fold")
        for event, person in sorted(rows, key=lambda item: (item[0].at, item[0].id)):
            table.add_row(person.label, event.at.strftime("%H:%M:%S"),
                          event.processor or "-", event.action, event.reason or "-",
                          event.outcome, event.vendor_request_id or "-")
        self.console.print()
        self.console.print(table)
        if not rows:
            raise DemoError("the ledger holds no audit events for these people")

    def _stop(self, daemon: subprocess.Popen[bytes], sandbox: subprocess.Popen[bytes]) -> None:
        code = self.processes.stop(daemon)
        if code != 0:
            raise DemoError(f"syncd run exited {code} after SIGTERM, not 0: "
                            f"{_last_line(_read(self.tmp / 'daemon.log'))}")
        self.processes.stop(sandbox)

    # -- reading the vendors -------------------------------------------------------------

    def _old_people(self, cut: date) -> list[Person]:
        """Live clients not seen or created since ``cut``, alone at their address, with a member.

        Labelled E, F, ...: E is the one scene 5 books; the rest the purge should erase.
        """
        rows = list(self._phorest_clients())
        holders = Counter(row["email"].lower() for row in rows if row.get("email"))
        people: list[Person] = []
        for row in rows:
            email, visit = row.get("email"), row.get("lastVisit")
            if (not email or holders[email.lower()] > 1 or row.get("deleted")
                    or row.get("mergedToClientId") or not row.get("createdAt")
                    or date.fromisoformat(row["createdAt"][:10]) >= cut
                    or (visit and date.fromisoformat(visit[:10]) >= cut)):
                continue
            person = Person(chr(ord("E") + min(len(people), 21)), row["clientId"], email)
            if self._member(person)[1] is not None:
                people.append(person)
        return people

    def _branch_id(self) -> str:
        phorest = self.settings.phorest
        body = self._json("GET", f"{phorest.base_url}/api/business/{phorest.business_id}/branch",
                          "Phorest GET branches",
                          auth=(phorest.username, phorest.password.get_secret_value()))
        branches = (body.get("_embedded") or {}).get("branches") or []
        if not branches:
            raise DemoError("Phorest lists no branch")
        return str(branches[0]["branchId"])

    def _holding(self, person: Person) -> Holding:
        """What Phorest and Mailchimp hold for ``person`` now, read through their APIs."""
        phorest = self.settings.phorest
        url = f"{phorest.base_url}/api/business/{phorest.business_id}/client/{person.client_id}"
        client = self._json("GET", url, "Phorest GET client",
                            auth=(phorest.username, phorest.password.get_secret_value()))
        status, member = self._member(person)
        merges = (member or {}).get("merge_fields") or {}
        return Holding(
            client.get("emailMarketingConsent"), client.get("smsMarketingConsent"),
            client.get("emailReminderConsent"), client.get("smsReminderConsent"),
            member["status"] if member else f"absent ({status})",
            tuple(sorted(k for k, v in merges.items() if k not in NAME_FIELDS and v)),
        )

    def _request_state(self, request_id: int) -> tuple[str, dict[str, str]]:
        """A request's state and each processor's, read from the ledger.

        Raises:
            DemoError: the request is unknown, or one of its steps failed.
        """
        with Ledger.open(self.settings.ledger.path) as ledger:
            request = ledger.request(request_id)
            steps = ledger.steps(request_id)
        if request is None:
            raise DemoError(f"the ledger holds no request #{request_id}")
        processors = rights.processor_states(steps)
        failed = sorted(name for name, state in processors.items() if state == "failed")
        if failed or request.state not in ("open", "done"):
            raise DemoError(f"request #{request_id} is {request.state}; failed steps: "
                            f"{', '.join(failed) or 'none'} (see syncd request show "
                            f"{request_id})")
        return request.state, processors

    def _request_steps(self, request_id: int) -> dict[str, str]:
        return self._request_state(request_id)[1]

    def _mailchimp_writes_since_request(self, person: Person, request_id: int) -> list[str]:
        """Mailchimp actions the ledger recorded for ``person`` after the request closed."""
        keys = engine.subject_keys(self.settings)
        with Ledger.open(self.settings.ledger.path) as ledger:
            events = ledger.audit_events(keys.client_id(person.client_id))
        closed = max((e.id for e in events if e.request_id == request_id
                      and e.action == "request_erase" and e.outcome == "done"), default=None)
        if closed is None:
            raise DemoError(f"the ledger has no completion entry for request #{request_id}")
        return sorted({e.action for e in events
                       if e.id > closed and e.processor == rights.MAILCHIMP})

    def _ga_deletion(self, person: Person) -> dict[str, Any] | None:
        """The GA emulator's record of a deletion naming ``person``'s client id, if any.

        The emulator keeps only a SHA-256 of the identifier, so this hashes the client id.
        """
        state = self._json("GET", f"{self.sandbox_url}/_sandbox/state", "sandbox state")
        digest = hashlib.sha256(person.client_id.encode()).hexdigest()
        return next((record for record in state["google"]["deletions"]
                     if record["identifier_sha256"] == digest), None)

    def _phorest_clients(self) -> Iterator[dict[str, Any]]:
        phorest = self.settings.phorest
        url = f"{phorest.base_url}/api/business/{phorest.business_id}/client"
        page = 0
        while True:
            body = self._json("GET", url, "Phorest GET clients",
                              auth=(phorest.username, phorest.password.get_secret_value()),
                              params={"size": PHOREST_PAGE_SIZE, "page": page,
                                      "includeArchived": "true", "includeDeleted": "true"})
            yield from (body.get("_embedded") or {}).get("clients", [])
            page += 1
            if page >= body["page"]["totalPages"]:
                return

    def _member(self, person: Person) -> tuple[int, dict[str, Any] | None]:
        mailchimp = self.settings.mailchimp
        url = f"{mailchimp.base_url}/lists/{mailchimp.list_id}/members/{person.member_hash}"
        response = self._call("GET", url, "Mailchimp GET member",
                              auth=("syncd-demo", mailchimp.api_key.get_secret_value()))
        if response.status_code == 404:
            return 404, None
        if response.status_code != 200:
            raise DemoError(f"Mailchimp GET member answered {response.status_code}")
        return 200, response.json()

    def _mailchimp(self, method: str, person: Person, **kwargs: Any) -> int:
        mailchimp = self.settings.mailchimp
        url = f"{mailchimp.base_url}/lists/{mailchimp.list_id}/members/{person.member_hash}"
        return self._call(method, url, f"Mailchimp {method} member",
                          auth=("syncd-demo", mailchimp.api_key.get_secret_value()),
                          **kwargs).status_code

    def _act(self, action: str, **arguments: Any) -> None:
        """A people action through the sandbox's control API."""
        response = self._call("POST", f"{self.sandbox_url}/_sandbox/actions/{action}",
                              f"sandbox action {action}", json=arguments)
        if response.status_code != 200:
            # The body may name the address: only the status is shown.
            raise DemoError(f"sandbox action {action} answered {response.status_code}")

    def _polls_ok(self) -> float:
        """The daemon's count of successful polls, from /metrics."""
        response = self._call("GET", f"{self._daemon_url}/metrics", "syncd /metrics")
        found = re.search(r'^syncd_polls_total\{outcome="ok"\} (\S+)$', response.text, re.M)
        return float(found.group(1)) if found else 0.0

    def _json(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        response = self._call(method, url, what, **kwargs)
        if response.status_code != 200:
            raise DemoError(f"{what} answered {response.status_code}")
        body: dict[str, Any] = response.json()
        return body

    def _call(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response:
        try:
            return self.http.request(method, url, timeout=HTTP_TIMEOUT_SECONDS, **kwargs)
        except requests.RequestException as error:
            raise DemoError(f"{what} failed ({type(error).__name__})") from error

    def _healthy(self) -> bool:
        try:
            response = self.http.get(f"{self._daemon_url}/healthz", timeout=HTTP_TIMEOUT_SECONDS)
        except requests.RequestException:
            return False  # not listening yet
        return response.status_code == 200

    def _syncd_command(self, arguments: Sequence[str], env: dict[str, str], *,
                       shown: str | None = None,
                       codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        """Run ``syncd --config … ARGUMENTS`` to its end, as an operator would.

        Args:
            arguments: the command and its options.
            env: the environment (rich tables are laid out to fit the demo's panels).
            shown: the arguments as printed, when they hold personal data.
            codes: the exit codes expected (1 too where a refusal is part of the story).

        Raises:
            DemoError: it did not finish in time or exited with another code.
        """
        name = "syncd " + " ".join(a for a in arguments[:2] if not a.startswith("-"))
        self.console.print(f"[dim]$ syncd --config {self.config_path} "
                           f"{shown or ' '.join(arguments)}[/]")
        command = [*_syncd(), "--config", str(self.config_path), *arguments]
        env = {**env, "COLUMNS": str(max(self.console.width - 4, 40))}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise DemoError(f"`{name}` did not finish within {self.timeout:g} s") from error
        if done.returncode not in codes:
            raise DemoError(f"`{name}` exited {done.returncode}: "
                            f"{_last_line(done.stderr or done.stdout)}")
        return done

    def _panel(self, title: str, done: subprocess.CompletedProcess[str], *,
               keep: str | None = None) -> None:
        """A command's output in a box; with ``keep``, only the output lines matching it."""
        # stderr says how the run went (e.g. handed to the running daemon); syncd redacts it.
        said = "\n".join(line for line in done.stderr.splitlines() if line.strip())
        out = done.stdout.rstrip()
        if keep is not None:
            out = "\n".join(line for line in out.splitlines() if re.match(keep, line))
        text = "\n".join(part for part in (said, out) if part) or "(no output)"
        self.console.print(Panel(Text(text), title=title, expand=False))

    # -- waiting and telling -------------------------------------------------------------

    def _wait(self, done: Callable[[], bool], what: str) -> float:
        """Wait until ``done()``; returns the seconds it took.

        Raises:
            DemoError: ``timeout`` passed first, or a watched process exited.
        """
        started = time.monotonic()
        while not done():
            for name, process, log_path in self.processes.running():
                if process.poll() is not None:
                    raise DemoError(f"{name} exited {process.returncode} while waiting for "
                                    f"{what}: {_last_line(_read(log_path))}")
            if time.monotonic() - started > self.timeout:
                raise DemoError(f"timed out after {self.timeout:g} s waiting for {what}")
            time.sleep(WAIT_STEP_SECONDS)
        return time.monotonic() - started

    def _say(self, command: str, result: str) -> None:
        self.console.print(f"[dim]$ {command}[/]\n  {result}")

    def _scene(self, number: int, title: str, person: Person, story: str) -> None:
        self.console.print()
        self.console.rule(f"[bold]{number}. {title}")
        self.console.print(f"Person {person.shown}\n{story}")

    def _show(self, person: Person, before: Holding, outcome: str, *,
              after: Holding | None = None) -> None:
        after = after or self._holding(person)
        table = Table(title=f"Person {person.label}: what each system holds", title_justify="left")
        table.add_column("")
        for name in ("Phorest\nemail marketing", "Phorest\nSMS marketing",
                     "Phorest reminders\nemail/SMS", "Mailchimp\nmember status",
                     "Mailchimp\nextra fields"):
            table.add_column(name)
        for label, holding in (("before", before), ("after", after)):
            table.add_row(label, _flag(holding.email_marketing), _flag(holding.sms_marketing),
                          f"{_flag(holding.email_reminders)}/{_flag(holding.sms_reminders)}",
                          holding.member_status, ", ".join(holding.extra_fields) or "none")
        self.console.print(table)
        self.console.print(f"[green]OK[/] {outcome}")


# -- processes ---------------------------------------------------------------------------


class _Processes:
    """The syncd processes the demo started; whatever still runs is stopped on exit."""

    def __init__(self) -> None:
        self._started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, command: list[str], log_path: Path,
              env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            # A session of its own: a terminal's Ctrl-C reaches the demo, which stops
            # the daemon before the sandbox it talks to.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._started.append((name, process, log_path))
        return process

    def running(self) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
        """(name, process, log file) of each process started and not stopped yet."""
        return list(self._started)

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        """SIGTERM, then SIGKILL if it has not exited in time. Returns the exit code."""
        self._started = [started for started in self._started if started[1] is not process]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def __enter__(self) -> _Processes:
        return self

    def __exit__(self, *_: object) -> None:
        left = [process for _name, process, _log in reversed(self._started)]
        try:
            for process in left:  # the daemon first, then the sandbox it talks to
                self.stop(process)
        finally:  # a second Ctrl-C while stopping: kill whatever is left
            for process in left:
                if process.poll() is None:
                    process.kill()
                    process.wait()


def _syncd() -> list[str]:
    """The ``syncd`` command of this Python (the console script when installed)."""
    script = Path(sys.executable).with_name("syncd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "syncd.cli"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _last_line(text: str) -> str:
    """The last line a process wrote, masked like syncd's own logs (for error messages)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return redact_text(lines[-1])[:300] if lines else "(no output)"


def _states(processors: dict[str, str]) -> str:
    return ", ".join(f"{name} {state}" for name, state in processors.items())


def _flag(value: bool | None) -> str:
    return "-" if value is None else "on" if value else "off"


if __name__ == "__main__":
    sys.exit(main())
