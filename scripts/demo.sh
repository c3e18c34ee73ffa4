#!/usr/bin/env bash
# The main demo: an unmodified Python web service in a (simulated) enclave, then as a secure container
# image under runc, on the embedded defaults (no CAS, dev mode). It installs what it needs, then shows
# what pyscone does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
