"""The agent against a real fleet on loopback: assign, switch under load, refuse a broken version, go back."""

from __future__ import annotations

import json
import pathlib
import re
import threading
import time

import numpy as np

from tests.agent_daemon.conftest import Version
from tests.agent_daemon.harness import Agent, Fleet, http, running


def _switches(agent: Agent) -> dict[str, float]:
    _status, text = http("GET", agent.url + "/metrics")
    out = {}
    for m in re.finditer(r'outpost_model_switches_total\{active_version="([^"]+)",model="demo"\} ([0-9.]+)', str(text)):
        out[m.group(1)] = float(m.group(2))
    return out


def test_assign_switch_under_load_refuse_broken_and_go_back(tmp_path: pathlib.Path, versions: dict[str, Version],
                                                           keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    agent = Agent(tmp_path / "device", fleet, keypair[1])
    with running(fleet, agent):
        for v in ("v1", "v2", "v3"):
            fleet.push(versions[v].archive)
        agent.start()
        fleet.assign(agent.device_id, versions["v1"].ref)
        agent.wait_serving("demo", "1.0.0")
        x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
        version, y = agent.infer("demo", x)
        assert version == "1.0.0"
        np.testing.assert_allclose(y, versions["v1"].expect(x), rtol=1e-5)
        downloads_v1 = agent.status()["downloads"]

        # v2 while 8 clients send a steady stream: zero failed requests, the switch in the metrics
        failures: list[str] = []
        seen: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    v, _ = agent.infer("demo", x)
                    seen.append(v)
                except Exception as e:
                    failures.append(str(e))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            fleet.assign(agent.device_id, versions["v2"].ref)
            agent.wait_serving("demo", "2.0.0")
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:5]
        assert "1.0.0" in seen and seen[-1] == "2.0.0" and len(seen) > 50
        assert _switches(agent) == {"2.0.0": 1.0}
        st = agent.status()
        (rec,) = st["bundles"]
        assert rec["active"] == "2.0.0" and rec["last_known_good"] == "1.0.0"
        # the fleet's view of the device, from its heartbeats: versions per slot, engine, runtime
        deadline = time.monotonic() + 20
        while True:
            state = fleet.api("GET", f"/api/v1/devices/{agent.device_id}").get("state") or {}
            models = {m["name"]: m for m in state.get("models", [])}
            if models.get("demo", {}).get("active") == "2.0.0" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        demo = models["demo"]
        assert demo["last_known_good"] == "1.0.0" and demo["backend"] == "ort-cpu", demo
        assert demo["stats"]["requests"] > 0 and state["runtime"]["onnxruntime"]
        assert state["assignment"]["serial"] == st["assignment"]["serial"]

        # a broken v3 (NaN outputs) fails its health gate: refused, v2 keeps serving
        fleet.assign(agent.device_id, versions["v3"].ref)
        st = agent.wait_for(lambda s: (s["bundles"][0]["last_failure"] or {}).get("ref") == "demo@3.0.0",
                            what="v3 refused")
        failure = st["bundles"][0]["last_failure"]
        assert failure["step"] == "warmup" and "not finite" in failure["reason"]
        assert st["bundles"][0]["active"] == "2.0.0"
        assert agent.infer("demo", x)[0] == "2.0.0"

        # back to v1: no download (the install is kept as last-known-good)
        downloads = agent.status()["downloads"]
        assert downloads == downloads_v1 + 2  # v2 and v3
        fleet.assign(agent.device_id, versions["v1"].ref)
        agent.wait_serving("demo", "1.0.0")
        assert agent.status()["downloads"] == downloads
        version, y = agent.infer("demo", x)
        assert version == "1.0.0"
        np.testing.assert_allclose(y, versions["v1"].expect(x), rtol=1e-5)
        assert agent.stop() == 0


def test_mqtt_front_end_answers_what_the_fleet_assigned(tmp_path: pathlib.Path, versions: dict[str, Version],
                                                        keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    from tests.agent.mqtt_broker import Requester, running_broker

    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    with running_broker(tmp_path / "broker") as broker:
        agent = Agent(tmp_path / "device", fleet, keypair[1], mqtt__url=broker.url, mqtt__prefix="site/dev1")
        with running(fleet, agent):
            fleet.push(versions["v1"].archive)
            agent.start()
            fleet.assign(agent.device_id, versions["v1"].ref)
            agent.wait_serving("demo", "1.0.0")
            x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
            body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                           "data": x.ravel().tolist()}]})
            req = Requester(broker.port).connect()
            try:
                req.subscribe("site/dev1/replies/t1")
                req.publish("site/dev1/models/demo/infer", body, response_topic="site/dev1/replies/t1",
                            correlation=b"c1")
                reply = req.get(timeout_s=20)
            finally:
                req.close()
            doc = json.loads(reply.payload)
            assert reply.correlation == b"c1" and doc["model_version"] == "1.0.0"
            np.testing.assert_allclose(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(1, 10),
                                       versions["v1"].expect(x), rtol=1e-5)
            assert agent.stop() == 0
