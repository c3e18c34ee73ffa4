#!/usr/bin/env bash
# The production path on one machine: a LAS, a CAS, and the notes service started only after
# remote attestation, with its arguments, secrets and FSPF key from the CAS. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/attest_demo.py "$@"
