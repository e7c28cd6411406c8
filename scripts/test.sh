#!/usr/bin/env bash
# The test command: set up what is missing, then lint, type-check and run the suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k verify`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff" >&2
ruff check .
echo "== mypy" >&2
mypy bundle engines agent fleet cli runtime contract
echo "== pytest" >&2
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected: that is a failure for us, not a pass.
exit $rc
