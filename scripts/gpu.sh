#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU (issue #5, CUDA tensors): sets up, shows the
# GPU, runs the CUDA tests (tests/gpu), then the CUDA benchmark (benches/cuda.py).
#   bash scripts/gpu.sh [benches/cuda.py args, e.g. --quick]
# With dist/torch_parallel-*.whl present (scripts/build-wheel.sh), uses that wheel and the
# machine's python3 with its torch instead of building (for GPU machines without Rust or network).
# Writes ${OUT:-bench-out}/gpu/: env.txt, pytest.log, bench.log, cuda.json, cuda.md.
# Exits non-zero when torch sees no GPU, when a test fails, or when the benchmark fails.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-bench-out}/gpu"
mkdir -p "$dest"
if compgen -G "dist/torch_parallel-*.whl" >/dev/null; then
  # A wheel built elsewhere (scripts/build-wheel.sh): a machine with torch and no Rust, no network
  # (the lent GPU machines). Installed beside that machine's own torch, nothing else fetched.
  PY=${PARALLEL_GPU_PYTHON:-python3}
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --target "$site" dist/torch_parallel-*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi

# What this run is on.
{
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c 'import torch, torch_parallel as p
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
print("torch_parallel:", getattr(p, "cuda_info", lambda: "cuda_info() missing")())' \
    || echo "importing torch or torch_parallel failed"
} 2>&1 | tee "$dest/env.txt"
# Without a GPU the tests would only skip: that is not a pass here.
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "gpu.sh: torch sees no CUDA device (see $dest/env.txt)"; exit 2; }

# Tests first; the benchmark runs even when they fail (its numbers help), the exit code says so.
set +e
"$PY" -m pytest -q -ra -p no:cacheprovider tests/gpu 2>&1 | tee "$dest/pytest.log"
tests=${PIPESTATUS[0]}
"$PY" examples/cuda_tensors.py 2>&1 | tee -a "$dest/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || tests=1
"$PY" benches/cuda.py --json "$dest/cuda.json" --md "$dest/cuda.md" "$@" 2>&1 | tee "$dest/bench.log"
bench=${PIPESTATUS[0]}
set -e
echo "gpu.sh: tests exit $tests, benchmark exit $bench; outputs in $dest"
[ "$tests" -eq 0 ] || exit "$tests"
exit "$bench"
