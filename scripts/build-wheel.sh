#!/usr/bin/env bash
# Builds into dist/:
#   torch_parallel-<version>-cp310-abi3-manylinux_2_28_x86_64.whl  any CPython >= 3.10 on any
#       x86_64 Linux with glibc >= 2.28: linked by zig (PyPI package `ziglang`, installed by
#       scripts/setup.sh from scripts/requirements-dev.txt) against glibc 2.28's symbols, whatever
#       this machine's glibc; maturin then checks it against the manylinux_2_28 policy (auditwheel
#       rules: no symbol newer than glibc 2.28, no library outside the policy) and fails otherwise.
#   torch_parallel-<version>.tar.gz  the sdist: the Rust workspace and the package, for
#       `pip install torch_parallel-<version>.tar.gz` where a Rust toolchain (cargo >= 1.85) is.
# Release build (LTO): several minutes of CPU from a cold target/, seconds when nothing changed.
# For machines that cannot build (the lent GPU machines: no Rust, no registry), `bash
# scripts/gpu.sh` installs the wheel next to the machine's own torch (docs/cuda.md).
#   PARALLEL_PYTHON  a Python with maturin and ziglang (default: .venv/bin/python, made by setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PARALLEL_PYTHON:-}" ]; then
  PY=$PARALLEL_PYTHON
else
  bash scripts/setup.sh >/dev/null
  PY=$PWD/.venv/bin/python
fi
root=$PWD
# maturin finds zig as `python3 -m ziglang` on PATH: the venv's python has it.
export PATH="$(dirname "$PY"):$PATH"
rm -rf dist && mkdir -p dist
cd bindings/python
# --zig: link against glibc 2.28 (zig ships the symbol tables of every glibc), not this machine's.
"$PY" -m maturin build --release --zig --compatibility manylinux_2_28 \
  --target x86_64-unknown-linux-gnu --out "$root/dist" 2>&1 | grep -E '^(📦|🔗|⚠️|💥|error|warning: unused)|Built wheel' || true
"$PY" -m maturin sdist --out "$root/dist" 2>&1 | grep -E 'Built source distribution|error' || true
cd "$root"
ls dist/torch_parallel-*-cp310-abi3-manylinux_2_28_x86_64.whl dist/torch_parallel-*.tar.gz >/dev/null \
  || { echo "build-wheel: the wheel or the sdist is missing from dist/ (see maturin's output above)" >&2; exit 1; }
ls -l dist/
