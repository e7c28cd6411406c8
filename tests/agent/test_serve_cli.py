"""`outpost serve` as a process: a v2 client we did not write (tritonclient) against it, trust, SIGTERM drain."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as tritonhttp  # a v2 client we did not write (the `dev` extra installs it)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", *args, "--port", str(self.port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        self.url = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("serve never became ready")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


@pytest.fixture
def served_cli(bundles: dict[str, pathlib.Path], keypair: tuple[pathlib.Path, pathlib.Path]) -> Iterator[ServeProcess]:
    p = ServeProcess(str(bundles["mlp"]), str(bundles["multi_io"]), str(bundles["cnn"]),
                     "--trust", str(keypair[1]), "--max-batch-size", "4")
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop()


def _infer(client: Any, model: str, arrays: dict[str, np.ndarray], binary: bool,
           outputs: list[str] | None = None) -> Any:
    inputs = []
    for name, arr in arrays.items():
        dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[arr.dtype]
        i = tritonhttp.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    outs = [tritonhttp.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    return client.infer(model, inputs, outputs=outs, request_id="req-7")


def test_tritonclient_json_and_binary_equal_bare_ort(served_cli: ServeProcess, reference: Any) -> None:
    client = tritonhttp.InferenceServerClient(served_cli.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    want = reference("mlp", {"input": x})["logits"]
    for binary in (False, True):
        result = _infer(client, "mlp", {"input": x}, binary, ["logits"])
        np.testing.assert_array_equal(result.as_numpy("logits"), want)
        assert result.get_response()["id"] == "req-7"
    feats = rng.standard_normal((2, 8)).astype(np.float32)
    ids = rng.integers(0, 9, (2, 4)).astype(np.int64)
    want2 = reference("multi_io", {"features": feats, "ids": ids})
    for binary in (False, True):
        result = _infer(client, "multi_io", {"features": feats, "ids": ids}, binary, ["scores", "label"])
        np.testing.assert_array_equal(result.as_numpy("scores"), want2["scores"])
        np.testing.assert_array_equal(result.as_numpy("label"), want2["label"])
    img = rng.standard_normal((6, 3, 224, 224)).astype(np.float32)  # over --max-batch-size 4: split
    result = _infer(client, "cnn", {"image": img}, True, ["logits"])
    np.testing.assert_allclose(result.as_numpy("logits"), reference("cnn", {"image": img})["logits"],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="expected datatype FP32"):
        _infer(client, "mlp", {"input": x.astype(np.int64)}, True)
    client.close()


def test_sigterm_drains_in_flight_and_exits_zero(served_cli: ServeProcess, reference: Any) -> None:
    client = tritonhttp.InferenceServerClient(served_cli.url, network_timeout=60)
    img = np.random.default_rng(4).standard_normal((16, 3, 224, 224)).astype(np.float32)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = _infer(client, "cnn", {"image": img}, True, ["logits"])
        except Exception as e:  # reported below
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)  # let the request reach the server (ordering only: it takes far longer than this)
    served_cli.proc.send_signal(signal.SIGTERM)
    t.join(60)
    code, err = served_cli.stop()
    assert "error" not in box, box.get("error")
    np.testing.assert_allclose(box["result"].as_numpy("logits"), reference("cnn", {"image": img})["logits"],
                               rtol=1e-4, atol=1e-4)
    assert code == 0, err
    assert "draining" in err and "stopped" in err


def test_untrusted_bundle_is_refused(bundles: dict[str, pathlib.Path],
                                     other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    p = ServeProcess(str(bundles["mlp"]), "--trust", str(other_keypair[1]))
    code, err = p.stop() if p.proc.wait(30) is not None else (None, "")
    assert code == 1 and "error" in err


def test_without_trust_it_serves_but_says_unverified(bundles: dict[str, pathlib.Path]) -> None:
    p = ServeProcess(str(bundles["mlp"]))
    try:
        p.wait_ready()
        client = tritonhttp.InferenceServerClient(p.url)
        assert client.get_model_metadata("mlp")["outpost"]["verified"] is False
        client.close()
    finally:
        code, err = p.stop()
    assert code == 0 and "UNVERIFIED" in err
