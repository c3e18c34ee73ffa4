#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, ruff, mypy --strict, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check pyscone tests bench examples
.venv/bin/ruff format --check -q pyscone tests bench examples
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
