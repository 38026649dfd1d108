#!/usr/bin/env bash
# Installs what the benches (benches/*.py) need beyond scripts/setup.sh: the peers and the plot.
#   Open MPI (mpirun) + its headers   Debian openmpi-bin libopenmpi-dev (mpi4py builds against them)
#   iperf3                             Debian iperf3 (benches/transport.py)
#   mpi4py, matplotlib                 into the project's .venv
# Idempotent: installs only what is missing; a second run only checks. Does not build
# torch_parallel (scripts/setup.sh does) and never fails the caller over an optional peer:
# a bench that lacks one reports that row as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PARALLEL_VENV:-.venv}
VPY="$VENV/bin/python"

log() { printf '[bench-setup] %s\n' "$*" >&2; }

if [ ! -x "$VPY" ]; then
  log "no $VPY yet: running scripts/setup.sh first"
  bash scripts/setup.sh
fi

# Debian packages, only when missing.
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
command -v mpicc >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)   # mpicc: mpi4py builds with it
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    log "apt-get install ${need_apt[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") >/dev/null 2>&1 \
      || log "could not install ${need_apt[*]} (the benches will skip those peers)"
  else
    log "no apt-get: install ${need_apt[*]} by hand (the benches will skip those peers)"
  fi
fi

# Python packages in the venv, only when missing.
need_pip=()
"$VPY" -c 'import matplotlib' >/dev/null 2>&1 || need_pip+=(matplotlib)
if command -v mpicc >/dev/null 2>&1; then
  "$VPY" -c 'import mpi4py' >/dev/null 2>&1 || need_pip+=(mpi4py)
else
  log "mpicc missing: not installing mpi4py (the MPI rows will be skipped)"
fi
if [ ${#need_pip[@]} -gt 0 ]; then
  log "pip install ${need_pip[*]}"
  "$VPY" -m pip install -q "${need_pip[@]}" || log "could not pip install ${need_pip[*]}"
fi

log "mpirun: $(command -v mpirun || echo missing); $("$VPY" -c 'import mpi4py; print("mpi4py", mpi4py.__version__)' 2>/dev/null || echo 'mpi4py missing'); $("$VPY" -c 'import matplotlib; print("matplotlib", matplotlib.__version__)' 2>/dev/null || echo 'matplotlib missing')"
