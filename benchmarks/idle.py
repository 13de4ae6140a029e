"""The idle daemon: CPU share and memory of `syncd run` when nothing is changing.

Starts an in-process sandbox (``--clients`` synthetic clients, 20 % drift,
real HTTP on 127.0.0.1) and ``syncd run`` as a subprocess on a fresh ledger,
with the default poll interval (60 s) and alert checks (60 s). After the first
full resync (``syncd status`` reports a last resync) and a settling pause, it
samples the daemon's ``/proc/<pid>`` for ``--seconds``:

- CPU share: (user + system time consumed) / wall time over the window;
- RSS at the end of the window, and VmHWM (the peak since start, which
  includes the first resync).

Targets: CPU under 1 %, RSS under 100 MB. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from syncd import config
from syncd.health import LAST_RESYNC_CURSOR
from syncd.ledger import Ledger
from syncd.sandbox.app import Sandbox

SYNCD = Path(sys.executable).with_name("syncd")
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _memory_mb(pid: int) -> dict[str, float]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=180.0, help="measurement window")
    parser.add_argument("--settle", type=float, default=15.0, help="pause after the resync")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, Sandbox(clients=args.clients, seed=7,
                                                       smtp_port=0) as sandbox:
        config_path = sandbox.write_config(Path(tmp) / "syncd.toml")
        ledger_path = config.load(config_path).ledger.path
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        env.update(SYNCD_DAEMON__LISTEN=f"127.0.0.1:{port}", SYNCD_CONSOLE__ENABLED="false",
                   SYNCD_PHOREST__POLL_INTERVAL_SECONDS="60")
        started = time.monotonic()
        daemon = subprocess.Popen([str(SYNCD), "--config", str(config_path), "run"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                if daemon.poll() is not None:
                    raise SystemExit(f"syncd run exited {daemon.returncode}")
                if _healthy(port) and Path(ledger_path).exists():
                    with Ledger.open(ledger_path) as ledger:
                        if ledger.get_cursor(LAST_RESYNC_CURSOR):
                            break
                if time.monotonic() - started > 600:
                    raise SystemExit("no first resync within 10 minutes")
                time.sleep(0.5)
            first_resync = time.monotonic() - started
            time.sleep(args.settle)
            cpu0, wall0 = _cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, wall1 = _cpu_seconds(daemon.pid), time.monotonic()
            memory = _memory_mb(daemon.pid)
            polls = sandbox.traffic.counts
        finally:
            daemon.terminate()
            code = daemon.wait(timeout=30)
    share = (cpu1 - cpu0) / (wall1 - wall0)
    print(json.dumps({
        "clients": args.clients,
        "first_resync_seconds": round(first_resync, 1),
        "window_seconds": round(wall1 - wall0, 1),
        "cpu_seconds": round(cpu1 - cpu0, 2),
        "cpu_percent": round(100 * share, 3),
        "rss_mb": round(memory["VmRSS"], 1),
        "peak_rss_mb": round(memory["VmHWM"], 1),
        "vendor_requests": sum(polls.values()),
        "exit_code": code,
        "targets": {"cpu_percent": "< 1", "rss_mb": "< 100"},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
