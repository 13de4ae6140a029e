"""Sandbox at scale: 100,000 clients and 100,000 members.

Pages through every client at the maximum page size and every member at 1000
per page over real HTTP, then prints JSON: seeding time, per-route server time
(p50/p95/max ms, from the sandbox's own handler timings), client wall time per
page, and the process's peak RSS (its own ``VmHWM``: the sandbox runs in it). Targets (issue: sandbox): a maximum-size
client page in under 10 ms of server time; memory under 600 MB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import requests

from syncd.sandbox.app import Sandbox

PHOREST_REQUESTS_PER_SECOND = 90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=100_000)
    args = parser.parse_args()

    started = time.perf_counter()
    sandbox = Sandbox(clients=args.clients, members=args.members, seed=1, smtp_port=None)
    seeded_seconds = time.perf_counter() - started
    c = sandbox.credentials
    with sandbox:
        session = requests.Session()
        session.auth = (c.phorest_username, c.phorest_password)
        url = f"{sandbox.base_url}/third-party-api-server/api/business/{c.phorest_business_id}/client"
        seen, page, pages, t0 = 0, 0, 0, time.perf_counter()
        while True:
            # Phorest allows 100 requests/s; stay under it as syncd does.
            time.sleep(max(0.0, t0 + pages / PHOREST_REQUESTS_PER_SECOND - time.perf_counter()))
            response = session.get(url, params={"page": page, "size": 200}, timeout=30)
            response.raise_for_status()
            body = response.json()
            seen += len(body["_embedded"]["clients"])
            pages += 1
            if body["page"]["number"] >= body["page"]["totalPages"] - 1:
                break
            page += 1
        client_seconds = time.perf_counter() - t0

        mc = requests.Session()
        mc.auth = ("anystring", c.mailchimp_api_key)
        murl = f"{sandbox.base_url}/3.0/lists/{c.mailchimp_list_id}/members"
        members_seen, offset, t0 = 0, 0, time.perf_counter()
        fields = "members.email_address,members.status,members.merge_fields,members.last_changed,total_items"
        while True:
            response = mc.get(
                murl, params={"count": 1000, "offset": offset, "fields": fields}, timeout=30
            )
            response.raise_for_status()
            body = response.json()
            members_seen += len(body["members"])
            offset += 1000
            if offset >= body["total_items"]:
                break
        member_seconds = time.perf_counter() - t0
        timings = sandbox.traffic.timing_summary()
    print(json.dumps({
        "clients": args.clients,
        "clients_seen": seen,
        "members": sandbox.mailchimp.members_count(),
        "members_seen": members_seen,
        "seed_seconds": round(seeded_seconds, 2),
        "client_pages": pages,
        "client_page_wall_ms_mean": round(client_seconds / pages * 1000, 2),
        "member_page_wall_ms_mean": round(member_seconds / max(1, members_seen // 1000) * 1000, 2),
        "server_time": timings,
        "peak_rss_mb": _vm_hwm_mb(),
    }, indent=2))


def _vm_hwm_mb() -> float:
    """This process's own peak RSS. Not ``ru_maxrss``, which also counts the high-water
    mark of the fork this process was exec'd from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    main()
