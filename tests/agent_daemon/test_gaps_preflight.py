"""Step 2 "before downloading": a bundle this device cannot run is refused before a byte of it is fetched.

Real fleet, real agent process, a counting proxy between them: the archive of
a bundle built for another architecture is never requested, the refusal is
recorded at step "preflight" with the reason, and serving goes on. The
constraints come from the signed assignment (the fleet copies them from the
stored manifest); documents without them stay valid.
"""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Any

import numpy as np
import pytest

from agent.daemon.errors import UpdateRefused
from agent.daemon.preflight import check_constraints
from contract import BundleConstraints
from engines import GpuInfo, HardwareInfo
from tests.agent_daemon.conftest import Version
from tests.agent_daemon.gaps_proxy import FleetProxy, ProxiedFleet
from tests.agent_daemon.harness import Agent, Fleet, http, running


def test_another_arch_is_refused_before_any_archive_byte(tmp_path: pathlib.Path, versions: dict[str, Version],
                                                         keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    with FleetProxy(fleet.url) as proxy:
        agent = Agent(tmp_path / "device", ProxiedFleet(proxy, fleet), keypair[1])  # type: ignore[arg-type]
        with running(fleet, agent):
            for v in ("v1", "arm"):
                fleet.push(versions[v].archive)
            agent.start()
            fleet.assign(agent.device_id, versions["v1"].ref)
            agent.wait_serving("demo", "1.0.0")
            v1_archive = "/api/v1/bundles/demo/1.0.0/archive"
            assert proxy.archive_bytes[v1_archive] == versions["v1"].archive.stat().st_size

            # the signed document itself carries the arm bundle's constraints
            fleet.assign(agent.device_id, versions["arm"].ref)
            _, env = http("GET", f"{fleet.url}/api/v1/devices/{agent.device_id}/assignment",
                          token=json.loads(agent.credential.read_text())["credential"])
            doc = json.loads(base64.b64decode(env["payload"]))
            assert doc["bundles"][0]["constraints"]["architectures"] == ["aarch64"]

            def refused(st: dict[str, Any]) -> bool:
                return any(e["kind"] == "install_refused" and e.get("ref") == "demo@2.1.0" for e in st["events"])

            st = agent.wait_for(refused, 60, "the arm bundle refused")
            ev = next(e for e in st["events"] if e.get("ref") == "demo@2.1.0")
            assert ev["step"] == "preflight" and "aarch64" in ev["reason"], ev
            # zero bytes of its archive were served: it was never even requested
            arm_archive = "/api/v1/bundles/demo/2.1.0/archive"
            assert proxy.archive_bytes.get(arm_archive, 0) == 0
            assert not [s for s in proxy.requests("archive") if s.path == arm_archive]
            assert st["downloads"] == 1
            # serving goes on with v1, and the fleet heard the reason
            version, out = agent.infer("demo", np.ones((1, 64), np.float32))
            assert version == "1.0.0" and np.allclose(out, versions["v1"].expect(np.ones((1, 64), np.float32)),
                                                      atol=1e-5)
            rec = next(b for b in st["bundles"] if b["name"] == "demo")
            assert rec["active"] == "1.0.0" and rec["last_failure"]["step"] == "preflight"


HW = HardwareInfo(arch="x86_64", cpu_name="test", cpu_count=2, onnxruntime_version="1.20.0",
                  ort_providers=("CPUExecutionProvider",))


@pytest.mark.parametrize("constraints,hw,needle", [
    (BundleConstraints(("aarch64",)), HW, "built for aarch64"),
    # GPU-only bundles on a device without a GPU: nothing to run them with
    (BundleConstraints(("x86_64",), None, ("tensorrt", "cuda")),
     HardwareInfo(arch="x86_64", cpu_name="t", cpu_count=2, onnxruntime_version="1.20.0",
                  ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
     "tensorrt: no NVIDIA GPU; cuda: no NVIDIA GPU"),
    # a GPU that is too old for the bundle, and no CPU engine allowed
    (BundleConstraints(("x86_64",), "8.7", ("cuda",)),
     HardwareInfo(arch="x86_64", cpu_name="t", cpu_count=2, gpus=(GpuInfo("T4", "7.5", 16 << 30),),
                  onnxruntime_version="1.20.0", ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
     "below the bundle's minimum 8.7"),
    # the runtime: a CUDA bundle where the ONNX Runtime build has no CUDA provider
    (BundleConstraints(("x86_64",), None, ("cuda",)),
     HardwareInfo(arch="x86_64", cpu_name="t", cpu_count=2, gpus=(GpuInfo("T4", "7.5", 16 << 30),),
                  onnxruntime_version="1.20.0", ort_providers=("CPUExecutionProvider",)),
     "no CUDAExecutionProvider"),
    (BundleConstraints(("x86_64",), None, ("cpu",)),
     HardwareInfo(arch="x86_64", cpu_name="t", cpu_count=2), "onnxruntime is not installed"),
])
def test_constraint_refusals(constraints: BundleConstraints, hw: HardwareInfo, needle: str) -> None:
    with pytest.raises(UpdateRefused) as e:
        check_constraints("demo@1", constraints, hw)
    assert e.value.step == "preflight" and needle in e.value.reason


def test_constraints_a_device_meets() -> None:
    check_constraints("demo@1", BundleConstraints(("x86_64", "aarch64"), "8.7", ("tensorrt", "cuda", "cpu")), HW)
    check_constraints("demo@1", BundleConstraints(("x86_64",)), HW)  # engines not stated: the default list

