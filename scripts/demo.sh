#!/usr/bin/env bash
# The main job in one command: `outpost up` starts a fleet server (SQLite, local blobs) and an agent
# enrolled to it, builds and signs a sample model, pushes and assigns it, waits until the agent
# serves it, and prints a ready-to-paste curl. Ctrl-C stops everything. State lives in ./demo-out/up
# (reused by the next run; delete it to start over). Extra arguments go to `outpost up`
# (e.g. `--port 8080`). `bash scripts/tour.sh` walks through the parts one by one instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p demo-out
exec outpost up --data demo-out/up "$@"
