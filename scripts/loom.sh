#!/usr/bin/env bash
# Model-checks the lock-free synchronisation of the work queues (crate parallel-workers) with
# loom: the work queue's ring (workers/src/ring.rs: Vyukov sequence numbers, batch push) and its
# parking protocol (workers/src/event.rs), which take their atomics from workers/src/sync.rs
# (SYNC-1), so a `--cfg loom` build swaps in loom's model-checked types and explores every
# interleaving.
#
# Not part of CI (.ci/run): the loom cfg rebuilds every dependency (its own target directory,
# target/loom) and exploring the models takes minutes. Run it after changing ring.rs, event.rs
# or sync.rs. Usage: scripts/loom.sh [extra test filters...]
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/loom}"
# LOOM_MAX_PREEMPTIONS bounds the search (the tests set their own where they need to).
cargo test -p parallel-workers --release --lib loom "$@"
