"""`outpost up`: one command to a served, fleet-assigned sample model; Ctrl-C stops everything."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import signal
import urllib.error
import urllib.request

import pytest

from tests.agent_daemon.harness import OUTPOST, Proc, free_port, http


@pytest.mark.timeout(240)
def test_up_serves_the_sample_and_the_printed_curl_works(tmp_path: pathlib.Path) -> None:
    port = free_port()
    up = Proc([*OUTPOST, "up", "--port", str(port), "--data", str(tmp_path / "up")])
    try:
        line = up.wait_line("curl -s -X POST", timeout_s=180)
        fleet_url = re.search(r"Fleet (http://\S+) ", up.wait_line("outpost up: ready.")).group(1)  # type: ignore[union-attr]
        args = shlex.split(line.strip())
        assert args[:4] == ["curl", "-s", "-X", "POST"]
        url, body = args[4], json.loads(args[args.index("-d") + 1])
        assert url == f"http://127.0.0.1:{port}/v2/models/sample-mlp/infer"
        status, reply = http("POST", url, body)
        assert status == 200, reply
        assert reply["model_name"] == "sample-mlp" and reply["outputs"][0]["shape"] == [1, 10]
        assert http("GET", f"{fleet_url}/api/v1/health")[0] == 200
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=60) == 0, up.output
        for dead in (url.rsplit("/v2/", 1)[0] + "/v2/health/live", f"{fleet_url}/api/v1/health"):
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                urllib.request.urlopen(dead, timeout=2)
        assert "outpost agent: stopped" in up.output and "fleet: stopped" in up.output
    finally:
        up.stop()
