#!/usr/bin/env bash
# Install everything pyscone needs on a Debian machine with Python >= 3.11, idempotently:
# system packages (libseccomp, curl, wrk, a C compiler), then a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

python=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$(command -v "$candidate"); break
  fi
done
[[ -n $python ]] || { echo "error: pyscone needs Python 3.11 or newer" >&2; exit 1; }

# System packages: libseccomp (the barrier), curl and wrk (tests, benchmarks), gcc and libc6-dev
# (the install builds the libc layer's shim; a test builds a C extension), PostgreSQL (the CAS's
# store is tested against a real server), venv support and headers for the interpreter in use;
# redis-server for the compatibility matrix's redis case (its redis-tools: redis-benchmark); stunnel4,
# the TLS terminator the network shield's benchmark compares against, and apache2-utils for its ab
# (a client that makes a full TLS handshake per connection: wrk resumes sessions); runc, umoci,
# skopeo and podman: the container tools the images are tested with (pyscone/image).
packages=(libseccomp2 curl wrk gcc libc6-dev postgresql redis-server stunnel4 apache2-utils runc umoci skopeo podman)
# kubectl, whose kustomize renders deploy/kubernetes for tests/test_k8s_manifests.py (offline): Debian's
# kubernetes-client, unless the machine already has a kubectl.
command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)
"$python" -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
"$python" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || packages+=(python3-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $python"
  "$python" -m venv .venv
fi
stamp=.venv/.pyscone-installed
# The install also builds the libc layer's shim (setup.py): again when one of its sources changed.
shim=pyscone/enclave/clib/libpyscone-shim.so
shim_changed=
for src in pyscone/enclave/clib/*.[ch]; do
  if [[ $src -nt $shim ]]; then shim_changed=1; fi
done
if [[ ! -f $stamp || pyproject.toml -nt $stamp || setup.py -nt $stamp || ! -f $shim || -n $shim_changed ]]; then
  log "installing pyscone and its development tools into .venv"
  pip_log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[dev,compat]'; } >"$pip_log" 2>&1; then
    cat "$pip_log" >&2; rm -f "$pip_log"; echo "error: pip install failed" >&2; exit 1
  fi
  rm -f "$pip_log"
  touch "$stamp"
fi
# An editable install is not byte-compiled by pip (a wheel's install is): compile the launcher's
# side once, so that `pyscone run` does not compile it at every start when the environment says
# PYTHONDONTWRITEBYTECODE.  (The enclave never trusts these: its loader measures what it runs.)
.venv/bin/python -m compileall -q pyscone >/dev/null 2>&1 || true
