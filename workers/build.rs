//! Declares the `loom` cfg, so `RUSTFLAGS="--cfg loom"` model-checks the lock-free queue
//! (workers/src/sync.rs) without an unexpected-cfg warning in ordinary builds.
#![allow(clippy::print_stdout)] // cargo reads a build script's directives from its stdout

fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
}
