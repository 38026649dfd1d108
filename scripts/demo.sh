#!/usr/bin/env bash
# The main demo: installs what it needs (scripts/setup.sh), then
#  1. examples/allreduce_demo.py: rank processes join a tree and all-reduce tensors of 4 KiB,
#     1 MiB and 64 MiB over shared memory and over TCP (the seed's example checked on every rank),
#     printing the plan and the figures;
#  2. examples/demo.py: a server and client processes exchanging values and a large tensor.
# Arguments go to the all-reduce demo (e.g. --ranks 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== [1/2] all-reduce across processes (examples/allreduce_demo.py)" >&2
PYTHONUNBUFFERED=1 .venv/bin/python examples/allreduce_demo.py "$@"
echo
echo "== [2/2] a server and clients exchanging values (examples/demo.py)" >&2
PYTHONUNBUFFERED=1 .venv/bin/python examples/demo.py --mib 64
