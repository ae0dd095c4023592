#!/usr/bin/env bash
# Run the test suite in a fresh (or existing) .venv: `bash tests/run.sh [pytest args]`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(DDTD_EXTRAS="${DDTD_EXTRAS:-test,text}" bash "$root/.ci/setup-env.sh" | tail -n 1)"
cd "$root"
exec "$python" -m pytest -q -p no:cacheprovider tests "$@"
