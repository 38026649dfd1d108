#!/usr/bin/env bash
# Builds the torch_parallel wheel (abi3: any CPython >= 3.10, any x86_64 Linux with glibc >= this
# machine's) into dist/, for machines that cannot build it themselves: the lent GPU machines have
# no Rust toolchain and no registry access. Then, on such a machine, `bash scripts/gpu.sh` installs
# it next to the machine's own torch (docs/cuda.md, "Running the GPU tests").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
rm -rf dist && mkdir -p dist
(cd bindings/python && "$OLDPWD/.venv/bin/python" -m maturin build --release --compatibility linux \
  --out "$OLDPWD/dist" -q 2>&1 | grep -v '^\s*$' | tail -n 2)
ls -l dist/
