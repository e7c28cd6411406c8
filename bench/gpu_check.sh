#!/usr/bin/env bash
# Engines on a GPU machine, in one go: install the `gpu` extra if it is missing, show what the
# probe sees, run the GPU-marked engine tests, then bench the chosen engine per model.
#   bash bench/gpu_check.sh            (from the repository root or anywhere)
#   GPU_CHECK_SKIP_INSTALL=1           use the environment as it is
# Output: the doctor report, pytest's summary, and one bench table per model, on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv .venv
fi
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  if ! "$PY" -c 'import tensorrt, polygraphy, pynvml, onnxruntime as o; assert "CUDAExecutionProvider" in o.get_available_providers()' 2>/dev/null; then
    echo "== installing the gpu extra (onnxruntime-gpu, tensorrt, polygraphy, nvidia-ml-py)" >&2
    "$PY" -m pip install -q --upgrade pip
    # onnxruntime and onnxruntime-gpu install the same module: never leave both.
    "$PY" -m pip uninstall -q -y onnxruntime >/dev/null 2>&1 || true
    "$PY" -m pip install -q -e ".[gpu,dev]" || "$PY" -m pip install -q -e ".[dev]" onnxruntime-gpu tensorrt polygraphy nvidia-ml-py
  fi
fi

echo "== outpost doctor"
"$PY" -m cli.main doctor

echo "== pytest -m gpu tests/engines"
set +e
"$PY" -m pytest -m gpu tests/engines -q -p no:cacheprovider -o addopts="--strict-markers -ra"
rc=$?
set -e

echo "== engine bench (auto backend, batch 1,8,32)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" - "$work" <<'EOF'
import sys, pathlib
sys.path.insert(0, ".")
import bundle
from tests.models.make_models import write_all
work = pathlib.Path(sys.argv[1])
paths = write_all(work / "models")
for name in ("mlp", "cnn", "big"):
    bundle.build([paths[name]], work / name, bundle.BuildOptions(name=name, version="1.0.0"))
EOF
for name in mlp cnn big; do
  "$PY" -m cli.main engine inspect "$work/$name" --cache "$work/cache" 2>/dev/null
  "$PY" -m cli.main engine bench "$work/$name" --cache "$work/cache" --batch 1,8,32 --iterations 500 2>/dev/null
done
exit $rc
