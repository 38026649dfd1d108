#!/usr/bin/env bash
# The main demo: installs what it needs (scripts/setup.sh), then runs examples/demo.py:
# a server and client processes on this machine exchanging values and a large tensor, over
# shared memory and over TCP, printing the figures. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
