#!/usr/bin/env bash
# A guided tour of the parts, one by one: a sample model built into a bundle,
# signed, packed for transport, unpacked and verified as a device would; the
# engine chosen for this machine; the bundle served over HTTP (Open Inference
# Protocol) and queried; then pushed to a local fleet server (SQLite + local
# files). Everything lands in ./demo-out (removed and recreated on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=demo-out
rm -rf "$out" && mkdir -p "$out"

echo "== sample model (an MLP: [batch,64] -> [batch,10])"
python tests/models/make_models.py "$out/models" | grep -E '^(mlp|multi_io):'

echo "== signing key"
outpost keys generate --out "$out/keys"

echo "== build, sign, inspect"
outpost bundle build "$out/models/mlp.onnx" --name sample-mlp --version 1.0.0 --release 1 \
  --owner demo --description "sample classifier" --slo-p95-ms 20 --batch-max 32 --out "$out/bundle"
outpost bundle sign "$out/bundle" --key "$out/keys/signing.key"
outpost bundle inspect "$out/bundle"

echo "== pack for transport, unpack on the 'device', verify"
outpost bundle pack "$out/bundle" --out "$out/sample-mlp-1.0.0.tar"
outpost bundle unpack "$out/sample-mlp-1.0.0.tar" --out "$out/device/bundle"
outpost bundle verify "$out/device/bundle" --trust "$out/keys/signing.pub"

echo "== a tampered copy is refused"
cp -r "$out/device/bundle" "$out/tampered"
printf '\x00' | dd of="$out/tampered/models/mlp.onnx" bs=1 seek=1000 conv=notrunc status=none
if outpost bundle verify "$out/tampered" --trust "$out/keys/signing.pub"; then
  echo "demo: tampered bundle was accepted" >&2; exit 1
fi

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() {  # URL: wait until it answers 200 (at most 30 s)
  for _ in $(seq 150); do
    if python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "demo: $1 did not come up" >&2; return 1
}
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

echo "== the engine this machine gets, and why not the others"
outpost engine inspect "$out/device/bundle" --trust "$out/keys/signing.pub" --cache "$out/engine-cache"

echo "== serve it (verified), ask for an inference over HTTP"
port=$(free_port)
outpost serve "$out/device/bundle" --trust "$out/keys/signing.pub" --port "$port" &
pids+=($!)
wait_http "http://127.0.0.1:$port/v2/health/ready"
python - "$port" <<'PY'
import json, sys, urllib.request
port = sys.argv[1]
body = {"id": "demo-1", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                   "data": [0.01 * i for i in range(128)]}]}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/sample-mlp/infer", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=10))
out = reply["outputs"][0]
print(f"inference {reply['id']}: {out['name']} {out['shape']} {out['datatype']}, first row "
      + ", ".join(f"{v:.3f}" for v in out["data"][:10]))
bad = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/sample-mlp/infer",
                             json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                                     "data": [1, 2, 3]}]}).encode(),
                             {"Content-Type": "application/json"})
try:
    urllib.request.urlopen(bad, timeout=10)
    sys.exit("demo: a wrong shape was accepted")
except urllib.error.HTTPError as e:
    print(f"wrong shape -> {e.code} {json.load(e)['error']}")
metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
print("metrics:", sum(1 for line in metrics.splitlines() if line.startswith("outpost_")), "outpost_* samples")
PY
kill -TERM "${pids[-1]}"; wait "${pids[-1]}"; unset 'pids[-1]'

echo "== a local fleet server (SQLite, local blob store); push the bundle to it"
fport=$(free_port)
outpost fleet serve --data "$out/fleet" --port "$fport" --trust "$out/keys/signing.pub" &
pids+=($!)
wait_http "http://127.0.0.1:$fport/api/v1/health"
export OUTPOST_FLEET_URL="http://127.0.0.1:$fport"
OUTPOST_FLEET_TOKEN=$(outpost fleet token create --data "$out/fleet" --role admin --name demo | tail -n 1)
export OUTPOST_FLEET_TOKEN
outpost fleet push "$out/sample-mlp-1.0.0.tar"
outpost fleet bundles
if outpost fleet push "$out/tampered" 2>/dev/null; then
  echo "demo: the fleet accepted a tampered bundle" >&2; exit 1
fi
echo "the fleet refused the tampered copy"
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true; unset 'pids[-1]'
echo "tour: OK"
