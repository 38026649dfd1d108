//! `docs/environment.md`, rendered from the table (CONFIG-2).

use super::parse::human_bytes;
use super::{LAUNCHER, TABLE, Var, VarKind};

/// The "accepted" column: the kind and its bounds.
fn accepted(kind: VarKind) -> String {
    match kind {
        VarKind::Int { min, max } => format!("{min}..={max}"),
        VarKind::Micros { min, max } => format!("{min}..={max} µs"),
        VarKind::Bytes { min, max } => {
            format!("size, {}..={}", human_bytes(min), human_bytes(max))
        }
        VarKind::Seconds => "duration".to_string(),
        VarKind::Bool => "0 or 1".to_string(),
        VarKind::Choice(w) => w.join(", "),
        VarKind::CpuList => "core list".to_string(),
        VarKind::LogFilter => "log filter".to_string(),
        VarKind::Secret => "text (non-empty)".to_string(),
        VarKind::SecretFile => "path".to_string(),
        VarKind::Text => "text".to_string(),
    }
}

fn render_rows(s: &mut String, rows: &[&Var]) {
    s.push_str("| variable | default | accepted | meaning |\n|---|---|---|---|\n");
    for v in rows {
        let default = if v.default.is_empty() {
            "(unset)".to_string()
        } else {
            format!("`{}`", v.default)
        };
        s.push_str(&format!(
            "| `{}` | {default} | {} | {} |\n",
            v.name,
            accepted(v.kind),
            v.doc
        ));
    }
}

/// Renders the tables as the Markdown of `docs/environment.md`.
pub fn render_markdown() -> String {
    let mut s = String::from(
        "# Environment variables\n\n<!-- Generated from engine/src/config/table.rs; a test fails when this file differs. \
         Regenerate with `cargo run -p parallel-engine --example envdoc > docs/environment.md`. -->\n\n\
         Every tuning knob of Parallel is one environment variable, read once per process when the engine \
         is first used. `torch_parallel.config()` returns the effective values.\n\n\
         **A malformed value is an error, never a default.** The first call that uses the configuration \
         (creating a server, client, tree, work queue or pool, `torch_parallel.config()`) fails with \
         `ConfigError`: `PARALLEL_X='value' is not valid: expected ...; set PARALLEL_X to an accepted value \
         or unset it (default: ...)`, naming the accepted form and its bounds. \
         Nothing runs on defaults, so a typo elsewhere cannot silently turn authentication off. \
         A blank value means the default, except for the secret: authentication is off only when both \
         `PARALLEL_SECRET` and `PARALLEL_SECRET_FILE` are unset; a blank secret, or a secret file that \
         cannot be read or is empty, is an error.\n\n\
         Forms accepted:\n\n\
         - **size**: a number with an optional unit, case-insensitive, spaces allowed: `K`, `Ki`, `KiB` \
         (and `M`, `G`, `T`, `P`) are powers of 1024; `KB`, `MB`, `GB`, `TB`, `PB` are SI, powers of 1000; \
         `B` or no unit: bytes. `4096`, `4k`, `4KiB` and `4 KiB` are 4096 bytes, `4KB` is 4000, `4MB` is \
         4000000, `4MiB` is 4194304, `1.5G` is 1610612736. A fraction must come to a whole number of bytes.\n\
         - **duration**: seconds as a decimal number (`30`, `0.5`), or with a unit: `500ms`, `30s`, `2min`, `1h`.\n\
         - **0 or 1**: also `true`/`false`, `yes`/`no`, `on`/`off`.\n\
         - **core list**: core numbers and ranges, comma-separated: `0-3,6`.\n\n",
    );
    render_rows(&mut s, TABLE);
    s.push_str(
        "\n## Launcher variables\n\n\
         Read by a tree when it resolves its rank, world size and root (after `PARALLEL_RANK`, \
         `PARALLEL_WORLD_SIZE` and `PARALLEL_ROOT`, in this order), when the tree is created. A malformed \
         one that the tree needs is a `ConfigError` of that tree; the others are not read.\n\n",
    );
    render_rows(&mut s, LAUNCHER);
    s
}
