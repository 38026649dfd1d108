//! Logging: `PARALLEL_LOG` turns the engine's `tracing` events into lines on stderr, and hands
//! each record to a forwarder (the Python bindings send them to the `logging` module).
//!
//! Invariants:
//! - LOG-1: nothing is installed while `PARALLEL_LOG` is unset or blank: no subscriber, no cost
//!   beyond tracing's disabled-callsite check. A malformed value is a `Config` error
//!   (CONFIG-3), raised where the configuration is first read; it never falls back to a default.
//! - LOG-2: the subscriber is installed at most once per process, when the configuration is
//!   first read successfully ([`crate::config::try_config`]); a process that already installed
//!   its own global subscriber keeps it (ours is then not installed, silently).
//! - LOG-3: a line carries the UTC time, the level, this process's tree rank (`-` before it
//!   joins a tree), the host name, the module and the event's fields (a link's peer or kind
//!   where the event names it). No event carries the shared secret (the config shows it as
//!   `<set>`; tests check the log of an authenticated run).
//! - LOG-4: the forwarder is called on the thread that emitted the event and must not block
//!   (the bindings queue the record; a Python thread delivers it).

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// One log record, as handed to the forwarder.
#[derive(Debug, Clone)]
pub struct Record {
    pub level: Level,
    /// The module that emitted it (`parallel_collectives::tree`, ...).
    pub target: String,
    /// The message and the event's other fields (`key=value`).
    pub message: String,
    /// The tree rank of this process, when it has joined one.
    pub rank: Option<usize>,
}

type Forward = Box<dyn Fn(&Record) + Send + Sync>;

static RANK: AtomicI64 = AtomicI64::new(-1);
static FORWARD: OnceLock<Forward> = OnceLock::new();
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Records this process's tree rank, shown on every later line (LOG-3).
pub fn set_rank(rank: usize) {
    RANK.store(rank as i64, Ordering::Relaxed);
}

fn rank() -> Option<usize> {
    usize::try_from(RANK.load(Ordering::Relaxed)).ok()
}

/// Sets the forwarder every record is also given to (once per process; later calls are
/// ignored). Must be called before the configuration is first read to see every record.
pub fn set_forwarder(f: Box<dyn Fn(&Record) + Send + Sync>) {
    let _ = FORWARD.set(f);
}

/// Checks a `PARALLEL_LOG` value (EnvFilter syntax: `info`, `debug`,
/// `parallel_collectives=debug,warn`, ...).
/// A bare word must be a level or one of our crates (`debugg` is refused, not read as a module).
pub fn parse_filter(text: &str) -> std::result::Result<EnvFilter, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for d in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !d.contains('=') && !d.contains('[');
        if bare && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) && !d.starts_with("parallel")
        {
            return Err(format!(
                "'{d}' is neither a level ({}) nor a module of Parallel (parallel_engine, parallel_collectives, ...)",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::builder()
        .parse(text.trim())
        .map_err(|e| e.to_string())
}

/// Installs the stderr (and forwarding) subscriber for `filter` (LOG-1, LOG-2). Called by
/// [`crate::config::try_config`] once the configuration is valid.
pub(crate) fn install(filter: &str) {
    if filter.trim().is_empty() {
        return; // LOG-1
    }
    INSTALLED.get_or_init(|| {
        let Ok(filter) = parse_filter(filter) else {
            return; // checked by the configuration already (CONFIG-3)
        };
        let subscriber = tracing_subscriber::registry().with(
            Lines {
                host: crate::topology::hostname(),
            }
            .with_filter(filter),
        );
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// The layer that writes lines and forwards records.
struct Lines {
    host: String,
}

impl<S: Subscriber> Layer<S> for Lines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let rank = rank();
        let rank_text = rank.map_or("-".to_string(), |r| r.to_string());
        let line = format!(
            "{} {:>5} rank={rank_text} host={} {}: {}\n",
            utc_now(),
            meta.level(),
            self.host,
            meta.target(),
            fields.text
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some(f) = FORWARD.get() {
            f(&Record {
                level: *meta.level(),
                target: meta.target().to_string(),
                message: fields.text,
                rank,
            });
        }
    }
}

/// The message first, then `key=value` for every other field.
#[derive(Default)]
struct Fields {
    text: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.text);
            let _ = write!(self.text, "{value:?}");
            if !rest.is_empty() {
                let _ = write!(self.text, " {rest}");
            }
        } else {
            if !self.text.is_empty() {
                self.text.push(' ');
            }
            let _ = write!(self.text, "{}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            if !self.text.is_empty() {
                self.text.push(' ');
            }
            let _ = write!(self.text, "{}={value}", field.name());
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, proleptic Gregorian; days-from-civil inverse).
fn utc_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_791), (2026, 12, 4));
    }

    #[test]
    fn malformed_filters_are_refused_and_per_module_filters_accepted() {
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("parallel_collectives=debug,warn").is_ok());
        assert!(parse_filter("parallel_engine=loud").is_err());
        assert!(parse_filter("debugg").is_err());
    }
}
