"""The agent honours 503 + Retry-After from its fleet: enroll, assignment poll and reports wait and retry.

A loopback proxy in front of a real fleet answers the first requests of each
route with 503 and ``Retry-After: 1``, exactly as the fleet's admission
control sheds a cold-start herd. The real `outpost agent enroll` and `outpost
agent run` processes must come back no sooner than asked, and a report the
fleet shed is sent again (the same bytes), never dropped. Past its retries,
the reporter keeps what it holds and delivers it once the fleet takes it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pathlib
import time

from agent.credentials import load_credential
from agent.fleet_client import FleetBusy, FleetClient
from agent.reporter import Reporter
from contract import build_report
from tests.agent_daemon.conftest import Version
from tests.agent_daemon.gaps_proxy import FleetProxy, ProxiedFleet, Seen
from tests.agent_daemon.harness import Agent, Fleet, running

SHED = 2


def _honoured(seen: list[Seen], route: str) -> None:
    """The first SHED answers were 503, each retry came at least the asked second later, then it went through."""
    statuses = [s.status for s in seen]
    assert statuses[:SHED] == [503] * SHED and statuses[SHED] < 300, (route, statuses)
    gaps = [b.at - a.at for a, b in itertools.pairwise(seen[:SHED + 1])]
    assert all(g >= 0.99 for g in gaps), (route, gaps)
    assert all(g < 5.0 for g in gaps), (route, gaps)  # bounded: Retry-After 1 s plus at most a quarter


def test_enroll_poll_and_reports_wait_as_asked(tmp_path: pathlib.Path, versions: dict[str, Version],
                                               keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    fleet.push(versions["v1"].archive)
    with FleetProxy(fleet.url, shed={"enroll": SHED, "assignment": SHED, "report": SHED}) as proxy:
        agent = Agent(tmp_path / "device", ProxiedFleet(proxy, fleet), keypair[1])  # type: ignore[arg-type]
        _honoured(proxy.requests("enroll"), "enroll")
        with running(fleet, agent):
            fleet.assign(agent.device_id, versions["v1"].ref)
            agent.start()
            agent.wait_serving("demo", "1.0.0")
            agent.wait_for(lambda st: len([s for s in proxy.requests("report") if s.status < 300]) >= 2,
                           30, "reports through")
            _honoured(proxy.requests("assignment"), "assignment")
            reports = proxy.requests("report")
            _honoured(reports, "report")
            # the shed reports were sent again and accepted, not dropped
            accepted = {s.body for s in reports if s.status < 300}
            assert all(s.body in accepted for s in reports if s.status == 503)
            assert all("reports_dropped" not in json.loads(s.body) for s in reports)

            # past its retries the reporter keeps its buffer; once the fleet takes reports it delivers them all
            cred = load_credential(agent.credential)

            async def outage() -> None:
                client = FleetClient(proxy.url, cred.device_id, cred.secret, busy_retries=1)
                reporter = Reporter(client, lambda: build_report(agent_version="test", time=time.time()),
                                    max_buffer=10)
                try:
                    proxy.shed["report"] = 100
                    for _ in range(3):
                        reporter.collect()
                    assert await reporter.flush() == 0
                    assert reporter.buffered == 3 and isinstance(reporter.last_error, FleetBusy)
                    assert reporter.dropped == 0 and reporter.rejected == 0
                    assert client.busy_waits == 1
                    proxy.shed["report"] = 0
                    assert await reporter.flush() == 3 and reporter.buffered == 0
                finally:
                    await client.aclose()

            asyncio.run(outage())

