#!/usr/bin/env bash
# Wheel smoke test (issue #15): builds the wheel and the sdist (scripts/build-wheel.sh), installs
# the wheel into a fresh virtualenv with only the dependencies it declares, and runs
# scripts/wheel_smoke.py there, so a file or a dependency missing from the wheel fails.
#
# torch (about 2.6 GB) is not downloaded. Phase 1 ("base") runs in the fresh venv exactly as
# `pip install <wheel>` left it (the wheel and numpy, from PyPI or pip's cache): import, the
# package's files, a 2-process all-reduce of numpy arrays, `python -m torch_parallel info`; it
# fails if torch is importable there. Only then, phase 2 ("torch") makes the dev venv's torch
# visible: a .pth file naming the dev venv's site-packages, which Python appends *after* the fresh
# venv's own, so torch_parallel still comes from the wheel (checked): a 2-process all-reduce of
# torch tensors, and the torch.distributed backend "parallel" registering where
# torch_parallel.distributed exists. The sdist's contents are checked (Cargo workspace, crates,
# package); building it from source is a full release build and is not repeated here.
#
# Time: scripts/build-wheel.sh (a release build: several minutes from a cold target/, about
# 20-60 s when only the workspace crates changed, seconds when nothing did) plus about 30 s for
# the venv, numpy from pip's cache and the two phases.
#   PARALLEL_PYTHON  a Python with maturin and ziglang, and torch for phase 2 (default .venv/bin/python)
#   SMOKE_NO_BUILD=1 use the wheel already in dist/
#   SMOKE_TORCH_PYTHON  the Python whose torch phase 2 uses (default: PARALLEL_PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ -z "${PARALLEL_PYTHON:-}" ]; then
  bash scripts/setup.sh >/dev/null
fi
DEV_PY=${PARALLEL_PYTHON:-$PWD/.venv/bin/python}
if [ "${SMOKE_NO_BUILD:-0}" != 1 ]; then
  PARALLEL_PYTHON=$DEV_PY bash scripts/build-wheel.sh
fi
wheel=$(ls dist/torch_parallel-*-cp310-abi3-manylinux_2_28_x86_64.whl)
sdist=$(ls dist/torch_parallel-*.tar.gz)
echo "wheel smoke: built $wheel and $sdist ($(( $(date +%s) - start ))s)"

# The wheel's tag and the libraries it needs (auditwheel, where installed).
if "$DEV_PY" -c 'import auditwheel' 2>/dev/null; then
  shown=$("$DEV_PY" -m auditwheel show "$wheel")
  grep -q 'platform tag: "manylinux_2_28_x86_64"' <<<"$(tr '\n' ' ' <<<"$shown")" \
    || { echo "$shown"; echo "wheel smoke: not manylinux_2_28" >&2; exit 1; }
  echo "wheel smoke: auditwheel: consistent with manylinux_2_28_x86_64"
fi
# The sdist holds what a source build needs.
listing=$(tar -tzf "$sdist")
for f in Cargo.toml Cargo.lock engine/Cargo.toml collectives/Cargo.toml bindings/python/Cargo.toml \
  pyproject.toml torch_parallel/__init__.py torch_parallel/_native.pyi; do
  grep -q "/$f\$" <<<"$listing" || { echo "wheel smoke: $f missing from $sdist" >&2; exit 1; }
done

venv=$(mktemp -d /tmp/wheel-smoke.XXXXXX)
trap 'rm -rf "$venv"' EXIT
"$DEV_PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
(cd "$venv" && env -u PYTHONPATH "$venv/bin/python" "$OLDPWD/scripts/wheel_smoke.py" base)

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"${SMOKE_TORCH_PYTHON:-$DEV_PY}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  >"$site/dev-venv-torch.pth"
(cd "$venv" && env -u PYTHONPATH "$venv/bin/python" "$OLDPWD/scripts/wheel_smoke.py" torch)
echo "wheel smoke: passed ($(( $(date +%s) - start ))s)"
