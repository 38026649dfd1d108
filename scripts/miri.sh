#!/usr/bin/env bash
# Runs the tests of the unsafe-heavy, pure-Rust modules under Miri (undefined-behaviour checker):
# the value model and its checked constructors (VALUE-3), the wire decoder (with the small heap
# buffers it receives into), and the reduction kernels (OPS-4). Modules that make syscalls Miri
# cannot emulate (pooled mmap buffers, io_uring, sockets, shared memory, CUDA) are not run here:
# their soundness rests on the BUF/RT/SHM invariants and the real-socket tests.
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
# proptest reads the working directory (failure persistence), which Miri's isolation forbids.
# rkyv's relative pointers are sound under Tree Borrows but not the older Stacked Borrows model
# (rkyv/rkyv#436): Stacked Borrows reports its CheckBytes derive, so the decoder runs under Tree
# Borrows.
export MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-tree-borrows ${MIRIFLAGS:-}"
# buffer:: is left out: its pooled regions call mmap/madvise/mlock, which Miri cannot run; the
# value and wire tests use its small (heap) buffers, which Miri does check.
cargo +nightly miri test -p parallel-engine --lib -- value:: wire:: "$@"
cargo +nightly miri test -p parallel-collectives --lib -- tests::ops_ "$@"
