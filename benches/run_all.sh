#!/usr/bin/env bash
# Runs every benchmark (each measures the peers in the same run) and writes docs/benchmarks.md
# from their Markdown sections. Not part of the test command: it takes about 5 minutes and wants
# a quiet machine. Usage: bash benches/run_all.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/bench-setup.sh
PY=.venv/bin/python
mkdir -p bench-out
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
$PY benches/transport.py "${quick[@]}" --md bench-out/transport.md --json bench-out/transport.json
$PY benches/allreduce.py "${quick[@]}" --md bench-out/allreduce.md --json bench-out/allreduce.json --png bench-out/allreduce.png
$PY benches/workers.py "${quick[@]}" --md bench-out/workers.md --json bench-out/workers.json || echo "workers bench failed"
$PY benches/netns_allreduce.py "${quick[@]}" || echo "netns bench skipped or failed (needs root and ip netns)"
$PY benches/ddp.py "${quick[@]}" --md bench-out/ddp.md --json bench-out/ddp.json || echo "ddp bench failed"
cp bench-out/allreduce.png docs/allreduce.png
{
  cat benches/benchmarks-header.md
  for f in transport allreduce netns_allreduce workers ddp; do
    [ -f "bench-out/$f.md" ] && { echo; cat "bench-out/$f.md"; }
  done
} > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
