//! The forms a value may take, and parsing a row's text into its Rust type ([`FromVar`]).
//!
//! A type accepts only the kinds it can hold (a `u64` an `Int`, `Micros` or `Bytes`, a `bool` a
//! `Bool`, ...); a row declared with a type that does not fit its kind is an internal error,
//! which the table's tests catch by parsing every default.

use super::{Var, VarKind, bad, internal};
use crate::error::Result;
use std::time::Duration;

pub(super) const GIB: u64 = 1 << 30;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const KIB: u64 = 1 << 10;

/// The accepted form of a size, as the documentation and the errors say it.
const BYTES_FORM: &str = "a size in bytes: a number with an optional unit, K M G T P or KiB MiB GiB TiB PiB (powers of 1024), KB MB GB TB PB (powers of 1000), coming to a whole number of bytes, e.g. 4096, 64K, 4MiB, 4MB, 1.5G";

/// A byte count for people: `64KiB`, `1GiB`, `1000`.
pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (1 << 50, "PiB"),
        (1 << 40, "TiB"),
        (GIB, "GiB"),
        (MIB, "MiB"),
        (KIB, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(u, _)| n >= *u && n % u == 0)
        .map_or_else(|| n.to_string(), |(u, s)| format!("{}{s}", n / u))
}

/// Parses a size: a number (digits, optionally a decimal fraction), optional spaces, an optional
/// unit, case-insensitive. `K`, `Ki`, `KiB` (and M, G, T, P) are powers of 1024; `KB`, `MB`,
/// `GB`, `TB`, `PB` are SI, powers of 1000; `B` or nothing: bytes. The result must be a whole
/// number of bytes (`1.5K` = 1536; `1.5` is refused) and fit in 64 bits.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => MIB,
        "g" | "gi" | "gib" => GIB,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return None,
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| d.bytes().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 18 {
        return None;
    }
    let whole = if int.is_empty() {
        0
    } else {
        int.parse::<u64>().ok()?.checked_mul(mul)?
    };
    if frac.is_empty() {
        return Some(whole);
    }
    let den = 10u128.pow(frac.len() as u32);
    let part = frac.parse::<u128>().ok()? * u128::from(mul);
    if part % den != 0 {
        return None;
    }
    whole.checked_add(u64::try_from(part / den).ok()?)
}

/// Parses a duration in seconds: a decimal number, optionally with a unit `ms`, `s`, `min`, `h`.
pub fn parse_seconds(s: &str) -> Option<f64> {
    let s = s.trim().to_ascii_lowercase();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = (s[..split].trim(), &s[split..]);
    let mul = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "min" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Parses a core list such as `0-3,6`.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// The accepted form of a kind, with its bounds, as the errors say it.
pub(super) fn accepted(kind: VarKind) -> String {
    match kind {
        VarKind::Int { min, max } => format!("a whole number from {min} to {max}"),
        VarKind::Micros { min, max } => {
            format!("a whole number of microseconds from {min} to {max}")
        }
        VarKind::Bytes { min, max } => format!(
            "{BYTES_FORM}; from {} to {}",
            human_bytes(min),
            human_bytes(max)
        ),
        VarKind::Seconds => {
            "a positive duration in seconds (e.g. 30, 0.5), or with a unit: 500ms, 30s, 2min, 1h"
                .to_string()
        }
        VarKind::Bool => "1, true, yes, on or 0, false, no, off".to_string(),
        VarKind::Choice(words) => format!("one of {}", words.join(", ")),
        VarKind::CpuList => "a core list like 0-3,6".to_string(),
        VarKind::LogFilter => {
            "a log filter such as info, debug or parallel_collectives=debug,warn".to_string()
        }
        VarKind::Secret => "a non-empty shared secret".to_string(),
        VarKind::SecretFile => "the path of a file holding the shared secret".to_string(),
        VarKind::Text => "text".to_string(),
    }
}

/// A Rust type a row's value parses into.
pub trait FromVar: Sized {
    /// Parses `text` (the value set, or the row's default; `None` when both are empty) as `var`
    /// says. A malformed value is a `Config` error naming the variable (CONFIG-3).
    fn from_var(var: &Var, text: Option<&str>) -> Result<Self>;
}

/// The text of a row that must have one (a required row has a default: tested).
fn need<'a>(var: &Var, text: Option<&'a str>) -> Result<&'a str> {
    text.ok_or_else(|| internal(var))
}

impl FromVar for u64 {
    fn from_var(var: &Var, text: Option<&str>) -> Result<u64> {
        let t = need(var, text)?;
        let no = || bad(var, t, &accepted(var.kind));
        let (v, min, max) = match var.kind {
            VarKind::Int { min, max } | VarKind::Micros { min, max } => {
                (t.trim().parse::<u64>().map_err(|_| no())?, min, max)
            }
            VarKind::Bytes { min, max } => (parse_bytes(t).ok_or_else(no)?, min, max),
            _ => return Err(internal(var)),
        };
        if v < min || v > max {
            return Err(no());
        }
        Ok(v)
    }
}

impl FromVar for usize {
    fn from_var(var: &Var, text: Option<&str>) -> Result<usize> {
        usize::try_from(u64::from_var(var, text)?).map_err(|_| internal(var))
    }
}

impl FromVar for Duration {
    fn from_var(var: &Var, text: Option<&str>) -> Result<Duration> {
        let t = need(var, text)?;
        match var.kind {
            VarKind::Micros { .. } => Ok(Duration::from_micros(u64::from_var(var, text)?)),
            VarKind::Seconds => {
                let v = parse_seconds(t).ok_or_else(|| bad(var, t, &accepted(var.kind)))?;
                if !(v.is_finite() && v > 0.0 && v <= 1e9) {
                    return Err(bad(var, t, &accepted(var.kind)));
                }
                Ok(Duration::from_secs_f64(v))
            }
            _ => Err(internal(var)),
        }
    }
}

impl FromVar for bool {
    fn from_var(var: &Var, text: Option<&str>) -> Result<bool> {
        let t = need(var, text)?;
        if var.kind != VarKind::Bool {
            return Err(internal(var));
        }
        parse_bool(t).ok_or_else(|| bad(var, t, &accepted(var.kind)))
    }
}

impl FromVar for String {
    fn from_var(var: &Var, text: Option<&str>) -> Result<String> {
        let t = text.unwrap_or("");
        match var.kind {
            VarKind::Choice(words) => {
                let w = t.trim().to_ascii_lowercase();
                if !words.contains(&w.as_str()) {
                    return Err(bad(var, t, &accepted(var.kind)));
                }
                Ok(w)
            }
            VarKind::LogFilter => {
                crate::log::parse_filter(t)
                    .map_err(|e| bad(var, t, &format!("{} ({e})", accepted(var.kind))))?;
                Ok(t.trim().to_string())
            }
            VarKind::Text | VarKind::SecretFile => Ok(t.to_string()),
            _ => Err(internal(var)),
        }
    }
}

impl FromVar for Vec<usize> {
    fn from_var(var: &Var, text: Option<&str>) -> Result<Vec<usize>> {
        let t = text.unwrap_or("");
        if var.kind != VarKind::CpuList {
            return Err(internal(var));
        }
        parse_cpu_list(t).ok_or_else(|| bad(var, t, &accepted(var.kind)))
    }
}

impl<T: FromVar> FromVar for Option<T> {
    fn from_var(var: &Var, text: Option<&str>) -> Result<Option<T>> {
        text.map(|t| T::from_var(var, Some(t))).transpose()
    }
}

/// A shared secret as read from the environment: its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret itself (for the handshake's key only: never log it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<set>")
    }
}

impl FromVar for Secret {
    fn from_var(var: &Var, text: Option<&str>) -> Result<Secret> {
        match var.kind {
            VarKind::Secret => Ok(Secret(need(var, text)?.to_string())),
            _ => Err(internal(var)),
        }
    }
}

/// Whether shared-memory links copy large segments by cross-memory attach (`PARALLEL_SHM_CMA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmaChoice {
    /// Where it pays: measured once per process (`link::sys::cma_pays`).
    Auto,
    On,
    Off,
}

impl CmaChoice {
    /// The words PARALLEL_SHM_CMA accepts (the boolean words it took before `auto`, too).
    pub const WORDS: &'static [&'static str] =
        &["auto", "1", "0", "on", "off", "true", "false", "yes", "no"];
}

impl FromVar for CmaChoice {
    fn from_var(var: &Var, text: Option<&str>) -> Result<CmaChoice> {
        if var.kind != VarKind::Choice(Self::WORDS) {
            return Err(internal(var));
        }
        Ok(match String::from_var(var, text)?.as_str() {
            "auto" => CmaChoice::Auto,
            "1" | "on" | "true" | "yes" => CmaChoice::On,
            "0" | "off" | "false" | "no" => CmaChoice::Off,
            _ => return Err(internal(var)),
        })
    }
}

/// The I/O backend requested by `PARALLEL_IO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoChoice {
    Auto,
    Uring,
    Epoll,
}

impl IoChoice {
    /// The words PARALLEL_IO accepts, in the order of the variants.
    pub const WORDS: &'static [&'static str] = &["auto", "uring", "epoll"];
}

impl FromVar for IoChoice {
    fn from_var(var: &Var, text: Option<&str>) -> Result<IoChoice> {
        if var.kind != VarKind::Choice(Self::WORDS) {
            return Err(internal(var));
        }
        Ok(match String::from_var(var, text)?.as_str() {
            "auto" => IoChoice::Auto,
            "uring" => IoChoice::Uring,
            "epoll" => IoChoice::Epoll,
            _ => return Err(internal(var)),
        })
    }
}
