#!/usr/bin/env bash
# Runs every benchmark (each measures the peers in the same run) and writes docs/benchmarks.md
# from their Markdown sections. Not part of the test command: it takes about 10 minutes and wants
# a quiet machine. Usage: bash benches/run_all.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/bench-setup.sh
PY=.venv/bin/python
mkdir -p bench-out
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
start=$(date +%s)
n=0
step() { n=$((n + 1)); printf '\n== [%s/7, %ss] %s\n' "$n" "$(( $(date +%s) - start ))" "$*" >&2; }
step "transport: ours against iperf3, raw sockets, pyzmq"
$PY benches/transport.py "${quick[@]}" --md bench-out/transport.md --json bench-out/transport.json
step "all-reduce: ours against torch.distributed gloo and Open MPI"
$PY benches/allreduce.py "${quick[@]}" --md bench-out/allreduce.md --json bench-out/allreduce.json --png bench-out/allreduce.png
step "all-reduce under load (one busy matmul thread per rank): ours against gloo and Open MPI"
$PY benches/allreduce.py "${quick[@]}" --load 1 --md bench-out/allreduce.md --json bench-out/allreduce.json || echo "under-load bench failed"
step "all-reduce with every rank bound to a CPU of its own: ours against gloo and Open MPI"
$PY benches/allreduce.py "${quick[@]}" --bind --sizes 4KiB,1MiB,64MiB --only ours_shm,ours_tcp,gloo,mpi --md bench-out/allreduce.md --json bench-out/allreduce.json || echo "bound bench failed"
step "workers: work queue against multiprocessing and torch.multiprocessing queues"
$PY benches/workers.py "${quick[@]}" --md bench-out/workers.md --json bench-out/workers.json || echo "workers bench failed"
step "all-reduce across network namespaces (simulated hosts)"
$PY benches/netns_allreduce.py "${quick[@]}" || echo "netns bench skipped or failed (needs root and ip netns)"
$PY benches/ddp.py "${quick[@]}" --md bench-out/ddp.md --json bench-out/ddp.json || echo "ddp bench failed"
$PY benches/overlap.py "${quick[@]}" --md bench-out/overlap.md --json bench-out/overlap.json || echo "overlap bench failed"
$PY benches/fsdp_collectives.py "${quick[@]}" --md bench-out/fsdp_collectives.md --json bench-out/fsdp_collectives.json || echo "fsdp collectives bench failed"
step "the demo launched 20 times: launch-to-launch spread"
$PY benches/demo_spread.py "${quick[@]}" --md bench-out/demo_spread.md --json bench-out/demo_spread.json || echo "demo spread bench failed"
cp bench-out/allreduce.png docs/allreduce.png
{
  cat benches/benchmarks-header.md
  for f in transport allreduce allreduce-load allreduce-bound netns_allreduce workers ddp overlap fsdp_collectives demo_spread; do
    [ -f "bench-out/$f.md" ] && { echo; cat "bench-out/$f.md"; }
  done
} > docs/benchmarks.md
echo "wrote docs/benchmarks.md ($(( $(date +%s) - start ))s)"
