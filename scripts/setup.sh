#!/usr/bin/env bash
# Installs everything the demo, the tests and the benches need on a fresh machine of this kind
# (Debian, rustup toolchain, CPython >= 3.10). Idempotent: a second run only checks.
#   .venv/            the Python environment (torch from PyPI, numpy, pyzmq, pytest, ruff, mypy)
#   torch_parallel    built with maturin into .venv (release, abi3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PARALLEL_VENV:-.venv}

log() { printf '[setup] %s\n' "$*" >&2; }

# Debian packages: iperf3 (bench peer), iproute2 (namespaced tests), libhwloc-dev with
# libudev-dev and pkg-config (the engine's `hwloc` feature; hwlocality-sys links libudev too).
# Only when missing.
need_apt=()
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
{ pkg-config --exists hwloc && pkg-config --exists libudev; } >/dev/null 2>&1 \
  || need_apt+=(pkg-config libhwloc-dev libudev-dev)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "apt-get install ${need_apt[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") >/dev/null 2>&1 \
    || log "could not install ${need_apt[*]} (benches that need them will say so)"
fi

# Rust components used by the test command.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.deps-$(sha256sum scripts/requirements-dev.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "pip install -r scripts/requirements-dev.txt (torch is about 2.6 GB the first time)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q -r scripts/requirements-dev.txt
  touch "$stamp"
fi

# With the test-only hooks the tests use (feature test-hooks); the wheel (build-wheel.sh) has none.
log "building torch_parallel (maturin, release, --features test-hooks)"
(cd bindings/python && "$OLDPWD/$VPY" -m maturin develop --release --features test-hooks -q 2>&1 | grep -v '^\s*$' | tail -n 3) \
  || { log "maturin build failed"; exit 1; }
log "ready: $VPY"
