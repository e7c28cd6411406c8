#!/usr/bin/env bash
# The main job on embedded defaults: a sample model built into a bundle,
# signed, packed for transport, unpacked and verified, as a device would.
# Everything lands in ./demo-out (removed and recreated on each run).
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
echo "demo: OK"
