#!/usr/bin/env bash
# Runs the tests of the unsafe-heavy, pure-Rust modules under Miri (undefined-behaviour checker):
# the value model and its checked constructors (VALUE-3), the wire decoder, the receive buffers,
# and the reduction kernels (OPS-4). Modules that make syscalls Miri cannot emulate (io_uring,
# sockets, shared memory, CUDA) are not run here: their soundness rests on the RT/SHM invariants
# and the real-socket tests.
#
# Needs a nightly toolchain with the miri component (rustup is the only thing it asks for):
#   rustup toolchain install nightly --component miri rust-src
# Not part of CI (.ci/run): Miri is ~1000x slower than a native run and needs nightly (STYLE.md:
# no nightly-only tooling in the build). Run it after changing an `unsafe` block in these modules.
# Takes about 10 minutes on 2 cores the first time (it builds every dependency under Miri), about
# a minute after that. Usage: scripts/miri.sh [extra test filters...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly miri --version >/dev/null 2>&1; then
  echo "Miri is not installed: rustup toolchain install nightly --component miri rust-src" >&2
  exit 2
fi
cargo +nightly miri setup
# Property tests run a few cases each under Miri (each case costs seconds there).
export PROPTEST_CASES="${PROPTEST_CASES:-8}"
# Buffers map memory with mmap, which Miri emulates only for anonymous mappings.
cargo +nightly miri test -p parallel-engine --lib -- value:: wire:: buffer:: "$@"
cargo +nightly miri test -p parallel-collectives --lib -- ops:: "$@"
