//! Prints docs/environment.md from the configuration table.
#![allow(clippy::print_stdout)] // a documentation generator writes to stdout by design

fn main() {
    print!("{}", parallel_engine::config::render_markdown());
}
