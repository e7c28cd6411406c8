#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: system packages that are
# missing (python3-venv, mosquitto, postgresql, systemd, chromium, wrk), then a virtual environment
# in .venv with Outpost installed in editable mode.
#   OUTPOST_EXTRAS  pip extras to install (default: cpu,fleet,dev)
#   OUTPOST_GPU=1   install the gpu extra instead of cpu (onnxruntime-gpu, TensorRT)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
extras=${OUTPOST_EXTRAS:-cpu,fleet,dev}
if [ "${OUTPOST_GPU:-0}" = 1 ]; then extras=${extras/cpu/gpu}; fi

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: $*" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v "$PY" >/dev/null 2>&1 || missing+=(python3)
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
# tests/systemd: systemd-analyze verify/security on the units, systemctl --root for install.sh
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# the dashboard's browser tests drive Debian's chromium through Playwright (never a downloaded browser)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.outpost-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [[ $extras == *gpu* ]]; then
    # onnxruntime and onnxruntime-gpu install the same module: never leave both.
    .venv/bin/python -m pip uninstall -q -y onnxruntime >/dev/null 2>&1 || true
  else
    .venv/bin/python -m pip uninstall -q -y onnxruntime-gpu >/dev/null 2>&1 || true
  fi
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv, extras: $extras)" >&2
