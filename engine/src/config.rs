//! Every environment variable the code reads, declared once and parsed in one place.
//!
//! One declarative table ([`table`], written with the `config_table!` macro) gives each variable
//! its name, Rust type, kind (with bounds), default and documentation. From it come the parser
//! ([`Settings`], one typed field per process variable), the typed handles of the variables read
//! when they are used ([`var`]: the tree's and the launcher's), `docs/environment.md`
//! ([`render_markdown`]) and the Python `config()` ([`Config::effective`]).
//!
//! Invariants:
//! - CONFIG-1: this is the only module that reads the environment (clippy's `disallowed-methods`
//!   guards it), and it reads a variable only through its row ([`Var`]), which only the table
//!   can make: a variable missing from the table cannot be read. Use sites name a typed field
//!   (`config().shm`) or a typed handle (`var::RANK.read()`), never a string or a position.
//! - CONFIG-2: [`TABLE`] and [`LAUNCHER`] list every row; `docs/environment.md` is rendered from
//!   them and a test fails when the file drifts. Every default parses within its bounds (tested).
//! - CONFIG-3: a malformed value is an error `NAME='value' is not valid: expected <form and
//!   bounds>; set NAME to an accepted value or unset it (default: ...)`; it is never replaced by
//!   a default.
//! - CONFIG-4 (fail closed): every public entry point (Server, Client, Tree, work queues, pools,
//!   the Python `config()`) calls [`try_config`] before anything else, so a malformed environment
//!   is a `Config` error there. [`config`] is for code that runs after such a call; reached with a
//!   malformed environment anyway it aborts the process: nothing ever runs on defaults, and
//!   authentication is never silently off.
//! - CONFIG-5: authentication is off only when PARALLEL_SECRET and PARALLEL_SECRET_FILE are both
//!   unset. A set but blank secret, an unreadable or empty secret file, is an error.
//!
//! The process variables are read once per process, on first use, and are immutable afterwards
//! (they are also validated then, with the tree's variables, so a malformed one fails every entry
//! point); the tree's and the launcher's variables are read again when a tree resolves its rank
//! (so a launcher that sets them late still works).
//!
//! Layout: `config/table.rs` (the rows), `config/parse.rs` (kinds, forms, typed parsing),
//! `config/markdown.rs` (the documentation), `config/tests.rs`.

mod markdown;
mod parse;
mod table;
#[cfg(test)]
mod tests;

pub use markdown::render_markdown;
pub use parse::{CmaChoice, FromVar, IoChoice, Secret, parse_bytes, parse_cpu_list, parse_seconds};
pub use table::{LAUNCHER, Settings, TABLE, var};

use crate::error::{Error, ErrorKind, Result};
use std::marker::PhantomData;
use std::sync::OnceLock;

/// The kind of a configuration value: how it is parsed, its bounds, and how the documentation
/// and the errors describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    /// Unsigned integer with an inclusive range.
    Int { min: u64, max: u64 },
    /// Microseconds, a whole number with an inclusive range.
    Micros { min: u64, max: u64 },
    /// A size in bytes with an inclusive range (see [`parse_bytes`] for the units).
    Bytes { min: u64, max: u64 },
    /// A positive duration: seconds as a decimal number, or with a unit (ms, s, min, h).
    Seconds,
    /// 1/true/yes/on or 0/false/no/off.
    Bool,
    /// One of a fixed set of words (case-insensitive).
    Choice(&'static [&'static str]),
    /// A list of cores such as `0-3,6`.
    CpuList,
    /// A log filter in tracing's EnvFilter syntax.
    LogFilter,
    /// A shared secret: never shown, and a blank value is an error (CONFIG-5).
    Secret,
    /// The path of a file holding a shared secret; a blank value is an error (CONFIG-5).
    SecretFile,
    /// Free text (validated where it is used, if at all).
    Text,
}

/// When a variable is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Once per process, into [`Settings`].
    Process,
    /// When a tree is created (and checked once with the process variables).
    Tree,
    /// When a tree is created and needs it: a launcher's variable (torchrun, SLURM, MPI, PMI).
    Launcher,
}

/// One row of the configuration table. Only the table makes rows (CONFIG-1).
#[derive(Debug)]
// A private field, not `#[non_exhaustive]`: no other module of this crate can make a row either.
#[allow(clippy::manual_non_exhaustive)]
pub struct Var {
    pub name: &'static str,
    pub kind: VarKind,
    /// Default as written by a user (empty: unset).
    pub default: &'static str,
    pub doc: &'static str,
    pub section: Section,
    _only_the_table: (),
}

/// A typed handle on a variable that is read when it is used ([`Section::Tree`],
/// [`Section::Launcher`]).
#[derive(Debug)]
pub struct Key<T> {
    pub var: Var,
    _type: PhantomData<fn() -> T>,
}

impl<T: FromVar> Key<T> {
    /// Reads the variable from the environment now, checked against its row (CONFIG-3). Unset or
    /// blank: the default (`None` for an optional variable without one).
    pub fn read(&self) -> Result<T> {
        parse_row(&self.var, &env_lookup)
    }
}

/// The effective configuration: the typed process variables ([`Settings`], reached through
/// `Deref`: `config().shm`), the shared secret, and every variable's effective text.
#[derive(Clone)]
pub struct Config {
    settings: Settings,
    /// The shared secret from PARALLEL_SECRET_FILE or PARALLEL_SECRET (CONFIG-5).
    pub secret: Option<Vec<u8>>,
    /// Every variable of [`TABLE`] with its effective value as text (the secret as `<set>`), in
    /// table order: what the Python `config()` returns.
    pub effective: Vec<(&'static str, String)>,
}

impl std::ops::Deref for Config {
    type Target = Settings;
    fn deref(&self) -> &Settings {
        &self.settings
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("settings", &self.settings)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

static CONFIG: OnceLock<std::result::Result<Config, Error>> = OnceLock::new();

/// One variable from the environment, through its row (CONFIG-1). A value that is not UTF-8 is
/// kept (lossily converted), so a numeric one fails validation and a secret stays set
/// (CONFIG-5): never "unset".
#[allow(clippy::disallowed_methods)] // CONFIG-1: the one place that reads the environment
fn env_lookup(var: &Var) -> Option<String> {
    match std::env::var(var.name) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => Some(v.to_string_lossy().into_owned()),
    }
}

/// The process configuration, or the error a malformed variable causes (CONFIG-3). Every
/// public entry point calls this first (CONFIG-4); the result is computed once per process.
pub fn try_config() -> Result<&'static Config> {
    match CONFIG.get_or_init(|| Config::from_lookup(&env_lookup)) {
        Ok(c) => {
            crate::log::install(&c.log); // LOG-2
            Ok(c)
        }
        Err(e) => Err(e.clone()),
    }
}

/// The process configuration, for code that runs after an entry point's [`try_config`].
///
/// Never returns defaults for a malformed environment: reached with one (an entry point that
/// forgot its check), it logs the error and aborts the process (CONFIG-4).
pub fn config() -> &'static Config {
    match try_config() {
        Ok(c) => c,
        Err(e) => unusable(&e),
    }
}

#[cold]
fn unusable(e: &Error) -> ! {
    use std::io::Write;
    tracing::error!("{e}; refusing to run on defaults");
    let _ = writeln!(
        std::io::stderr(),
        "parallel: {e}; refusing to run on defaults (aborting)"
    );
    std::process::abort()
}

/// Looks a variable up: the environment, or a test's map.
pub type Lookup<'a> = &'a dyn Fn(&Var) -> Option<String>;

/// The text a row takes: the value set (trimmed, except a secret), else its default; `None`
/// when both are empty. A blank value means the default, except for a secret (CONFIG-5).
fn text_of(var: &Var, lookup: Lookup<'_>) -> Result<Option<String>> {
    match lookup(var) {
        // The value is blank, so naming it discloses nothing.
        Some(s) if s.trim().is_empty() && var.kind == VarKind::Secret => Err(bad(
            var,
            &s,
            &format!("a non-empty shared secret ({SECRET_OFF})"),
        )),
        Some(s) if s.trim().is_empty() && var.kind == VarKind::SecretFile => Err(bad(
            var,
            &s,
            &format!("the path of a file holding the shared secret ({SECRET_OFF})"),
        )),
        Some(s) if var.kind == VarKind::Secret => Ok(Some(s)),
        Some(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        _ => Ok(Some(var.default.to_string()).filter(|d| !d.is_empty())),
    }
}

/// One row, read and parsed into its type.
fn parse_row<T: FromVar>(var: &Var, lookup: Lookup<'_>) -> Result<T> {
    let text = text_of(var, lookup)?;
    T::from_var(var, text.as_deref())
}

/// The error of a malformed value (CONFIG-3): the variable, the value, what is accepted, and
/// what to do.
pub(crate) fn bad(var: &Var, value: &str, expected: &str) -> Error {
    let default = if var.default.is_empty() {
        "unset".to_string()
    } else {
        var.default.to_string()
    };
    let name = var.name;
    Error::new(
        ErrorKind::Config,
        "config",
        format!(
            "{name}='{}' is not valid: expected {expected}; set {name} to an accepted value or unset it (default: {default})",
            value.escape_debug()
        ),
    )
}

/// A row whose type cannot hold its kind, or that has no value where one is needed: a mistake
/// in the table, caught by the tests.
pub(crate) fn internal(var: &Var) -> Error {
    Error::new(
        ErrorKind::Config,
        "config",
        format!(
            "internal error: {} is declared with a type that does not fit its kind or default",
            var.name
        ),
    )
}

const SECRET_OFF: &str =
    "unset PARALLEL_SECRET and PARALLEL_SECRET_FILE to turn authentication off";

/// The shared secret (CONFIG-5): from PARALLEL_SECRET_FILE (which wins), else PARALLEL_SECRET;
/// None only when both are unset.
fn read_secret(s: &Settings) -> Result<Option<Vec<u8>>> {
    const OFF: &str = SECRET_OFF;
    let file = &var::PARALLEL_SECRET_FILE;
    if let Some(path) = &s.secret_file {
        let mut bytes = std::fs::read(path).map_err(|e| {
            bad(
                file,
                path,
                &format!(
                    "a readable file holding the shared secret (reading it failed: {e}; {OFF})"
                ),
            )
        })?;
        while bytes.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(bad(
                file,
                path,
                &format!("a file holding the shared secret, but it is empty ({OFF})"),
            ));
        }
        return Ok(Some(bytes));
    }
    Ok(s.secret_env
        .as_ref()
        .map(|t| t.expose().as_bytes().to_vec()))
}

impl Config {
    /// Builds a configuration from a lookup function (the environment, or a test's map).
    pub fn from_lookup(lookup: Lookup<'_>) -> Result<Config> {
        let settings = Settings::from_lookup(lookup)?;
        table::check_tree_section(lookup)?;
        let secret = read_secret(&settings)?;
        let mut effective = Vec::with_capacity(TABLE.len());
        for var in TABLE {
            let text = text_of(var, lookup)?.unwrap_or_default();
            let shown = if var.kind == VarKind::Secret && !text.is_empty() {
                "<set>".to_string()
            } else {
                text
            };
            effective.push((var.name, shown));
        }
        Ok(Config {
            settings,
            secret,
            effective,
        })
    }
}
