//! The table's tests: every row documented, defaults within bounds, every malformed form of
//! every kind an error naming the variable, the documentation in sync (CONFIG-2, CONFIG-3).

use super::parse::{GIB, MIB};
use super::table::check_row;
use super::*;
use std::collections::HashMap;
use std::time::Duration;

fn with(pairs: &[(&str, &str)]) -> Result<Config> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    Config::from_lookup(&|v: &Var| m.get(v.name).cloned())
}

fn err(pairs: &[(&str, &str)]) -> String {
    with(pairs).unwrap_err().to_string()
}

#[test]
fn defaults_parse() {
    let c = with(&[]).unwrap();
    assert_eq!(c.io, IoChoice::Auto);
    assert_eq!(c.max_value_depth, 64);
    assert_eq!(c.max_frame, 64 * GIB);
    assert_eq!(c.shm_ring, 4 * MIB as usize);
    assert!(c.secret.is_none());
    assert_eq!(c.effective.len(), TABLE.len());
}

fn all_rows() -> impl Iterator<Item = &'static Var> {
    TABLE.iter().chain(LAUNCHER.iter()).copied()
}

#[test]
fn config_2_every_row_is_documented_named_once_and_in_its_section() {
    let mut names: Vec<_> = all_rows().map(|v| v.name).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(n, names.len(), "a variable is listed twice");
    for v in all_rows() {
        assert!(
            v.doc.len() > 20 && v.doc.ends_with('.'),
            "{}: {:?}",
            v.name,
            v.doc
        );
    }
    for v in TABLE {
        assert!(v.name.starts_with("PARALLEL_"), "{}", v.name);
        assert_ne!(v.section, Section::Launcher, "{}", v.name);
    }
    for v in LAUNCHER {
        assert!(!v.name.starts_with("PARALLEL_"), "{}", v.name);
        assert_eq!(v.section, Section::Launcher, "{}", v.name);
    }
}

#[test]
fn config_2_every_default_parses_into_its_type_within_bounds() {
    for v in all_rows() {
        check_row(v, &|_| None).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        if let VarKind::Int { min, max }
        | VarKind::Micros { min, max }
        | VarKind::Bytes { min, max } = v.kind
        {
            assert!(min <= max, "{}", v.name);
        }
    }
}

/// Values each kind refuses (an empty list: the kind takes any text).
fn malformed(kind: VarKind) -> &'static [&'static str] {
    match kind {
        VarKind::Int { .. } | VarKind::Micros { .. } => {
            &["x", "-1", "1.5", "99999999999999999999", "0x10", "1e3"]
        }
        VarKind::Bytes { .. } => &["lots", "-1", "1.5", "4 furlongs", "20000P", "1,5K"],
        VarKind::Seconds => &["soon", "0", "-5", "NaN", "inf", "5 fortnights"],
        VarKind::Bool => &["maybe", "2", "y"],
        VarKind::Choice(_) => &["kqueue", "a'b\nc"],
        VarKind::CpuList => &["0-x", "3-1", "a"],
        VarKind::LogFilter => &["debugg", "info,verbose"],
        VarKind::Secret | VarKind::SecretFile => &["", "  "],
        VarKind::Text => &[],
    }
}

#[test]
fn config_3_each_malformed_value_of_each_row_is_an_error_naming_it() {
    let mut checked = 0;
    for v in all_rows() {
        for bad_value in malformed(v.kind) {
            let e = check_row(v, &|w: &Var| {
                (w.name == v.name).then(|| bad_value.to_string())
            })
            .err()
            .unwrap_or_else(|| panic!("{}='{bad_value}' was accepted", v.name));
            let text = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Config, "{text}");
            let head = format!(
                "{}='{}' is not valid: expected ",
                v.name,
                bad_value.escape_debug()
            );
            assert!(text.contains(&head), "{text}");
            let todo = format!("set {} to an accepted value or unset it (default: ", v.name);
            assert!(text.contains(&todo), "{text}");
            checked += 1;
        }
    }
    assert!(checked > 150, "{checked}");
}

#[test]
fn config_3_each_malformed_kind_names_variable_value_and_form() {
    let cases: &[(&str, &str, &str)] = &[
        ("PARALLEL_SHM_RING", "lots", "KiB MiB GiB"),
        ("PARALLEL_SHM_RING", "4 furlongs", "powers of 1000"),
        ("PARALLEL_MAX_FRAME", "-1", "a size in bytes"),
        ("PARALLEL_MAX_FRAME", "1.5", "whole"), // not a whole number of bytes
        (
            "PARALLEL_MAX_FRAME",
            "99999999999999999999",
            "a size in bytes",
        ),
        ("PARALLEL_MAX_FRAME", "20000P", "a size in bytes"), // overflows 64 bits
        ("PARALLEL_SHM_RING", "1K", "from 64KiB to 1GiB"),
        ("PARALLEL_THREADS", "99999", "from 0 to 1024"),
        (
            "PARALLEL_SPIN_US",
            "2000000",
            "microseconds from 0 to 1000000",
        ),
        ("PARALLEL_LOG", "debugg", "neither a level"),
        ("PARALLEL_THREADS", "four", "a whole number"),
        ("PARALLEL_THREADS", "-1", "a whole number"),
        ("PARALLEL_TIMEOUT", "soon", "duration in seconds"),
        ("PARALLEL_TIMEOUT", "0", "positive"),
        ("PARALLEL_TIMEOUT", "-5", "positive"),
        ("PARALLEL_TIMEOUT", "NaN", "positive"),
        ("PARALLEL_TIMEOUT", "inf", "positive"),
        ("PARALLEL_TIMEOUT", "5 fortnights", "500ms"),
        (
            "PARALLEL_SHM",
            "maybe",
            "1, true, yes, on or 0, false, no, off",
        ),
        ("PARALLEL_IO", "kqueue", "one of auto, uring, epoll"),
        ("PARALLEL_CPUS", "0-x", "a core list"),
        ("PARALLEL_RANK", "first", "a whole number"),
        ("PARALLEL_WORLD_SIZE", "0", "from 1 to"),
    ];
    for (name, value, form) in cases {
        let e = err(&[(name, value), ("PARALLEL_SECRET", "s")]);
        let head = format!("{name}='{value}' is not valid: expected ");
        assert!(e.contains(&head), "{name}={value}: {e}");
        assert!(e.contains(form), "{name}={value}: {e} lacks {form:?}");
        assert!(!e.contains("='s'"), "the secret leaked: {e}");
    }
    // Quotes and control characters in a value are escaped, not printed raw.
    let e = err(&[("PARALLEL_IO", "a'b\nc")]);
    assert!(e.contains(r"PARALLEL_IO='a\'b\nc' is not valid"), "{e}");
}

#[test]
fn config_3_malformed_variable_never_yields_defaults_or_drops_the_secret() {
    // The old behaviour: one bad variable made everything default, secret included.
    assert!(with(&[("PARALLEL_SECRET", "s"), ("PARALLEL_SHM_RING", "lots")]).is_err());
    let c = with(&[("PARALLEL_SECRET", "s"), ("PARALLEL_SHM_RING", "8MiB")]).unwrap();
    assert_eq!(c.secret.as_deref(), Some(&b"s"[..]));
}

#[test]
fn config_bytes_accepts_the_forms_people_write() {
    let cases: &[(&str, u64)] = &[
        ("4096", 4096),
        ("4096B", 4096),
        ("4k", 4096),
        ("4K", 4096),
        ("4Ki", 4096),
        ("4KiB", 4096),
        ("4kib", 4096),
        ("4 KiB", 4096),
        (" 4 KiB ", 4096),
        ("4KB", 4000),
        ("4kB", 4000),
        ("4MB", 4_000_000),
        ("4M", 4 * MIB),
        ("4MiB", 4 * MIB),
        ("4 MiB", 4 * MIB),
        ("1.5G", 3 * GIB / 2),
        ("1.5GiB", 3 * GIB / 2),
        ("0.5K", 512),
        (".5K", 512),
        ("2.0", 2),
        ("1GB", 1_000_000_000),
        ("2T", 2 << 40),
        ("1TB", 1_000_000_000_000),
        ("1P", 1 << 50),
        ("1PB", 1_000_000_000_000_000),
        ("0", 0),
    ];
    for (text, want) in cases {
        assert_eq!(parse_bytes(text), Some(*want), "{text:?}");
    }
    for text in [
        "", ".", "K", "4KK", "4 K B", "1.2.3K", "0x10", "4e3", "-4K", "4KiBs", "1.5", "0.3K",
        "16EiB", "1,5K",
    ] {
        assert_eq!(parse_bytes(text), None, "{text:?}");
    }
    let c = with(&[("PARALLEL_SHM_RING", "4 MiB"), ("PARALLEL_CHUNK", "4MB")]).unwrap();
    assert_eq!(c.shm_ring, 4 * MIB as usize);
    assert_eq!(c.chunk, 4_000_000);
}

#[test]
fn config_durations_and_booleans() {
    let c = with(&[
        ("PARALLEL_TIMEOUT", "500ms"),
        ("PARALLEL_CONNECT_TIMEOUT", "2min"),
        ("PARALLEL_HANDSHAKE_TIMEOUT", "0.25"),
        ("PARALLEL_SHM", "off"),
        ("PARALLEL_MLOCK", "Yes"),
    ])
    .unwrap();
    assert_eq!(c.timeout, Duration::from_millis(500));
    assert_eq!(c.connect_timeout, Duration::from_secs(120));
    assert_eq!(c.handshake_timeout, Duration::from_millis(250));
    assert!(!c.shm && c.mlock);
    assert_eq!(parse_seconds("1h"), Some(3600.0));
    assert_eq!(parse_seconds("30 s"), Some(30.0));
}

#[test]
fn values_and_suffixes() {
    let c = with(&[
        ("PARALLEL_SHM_RING", "8M"),
        ("PARALLEL_IO", "EPOLL"),
        ("PARALLEL_CPUS", "0-2,5"),
        ("PARALLEL_THREADS", " 3 "),
    ])
    .unwrap();
    assert_eq!(c.shm_ring, 8 << 20);
    assert_eq!(c.io, IoChoice::Epoll);
    assert_eq!(c.cpus, vec![0, 1, 2, 5]);
    assert_eq!(c.threads, 3);
    // Blank means the default for a tuning knob.
    assert_eq!(with(&[("PARALLEL_THREADS", " ")]).unwrap().threads, 0);
    let c = with(&[("PARALLEL_SECRET", "s3")]).unwrap();
    assert_eq!(c.secret.as_deref(), Some(&b"s3"[..]));
    assert!(
        c.effective
            .iter()
            .any(|(n, v)| *n == "PARALLEL_SECRET" && v == "<set>")
    );
}

fn temp_file(tag: &str, contents: Option<&[u8]>) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("parallel-config-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    if let Some(c) = contents {
        std::fs::write(&p, c).unwrap();
    }
    p
}

#[test]
fn config_5_only_unsetting_the_secret_turns_authentication_off() {
    // Blank secret: an error, not "no secret".
    for blank in ["", "  "] {
        let e = err(&[("PARALLEL_SECRET", blank)]);
        assert!(
            e.contains("PARALLEL_SECRET='") && e.contains("non-empty"),
            "{e}"
        );
    }
    // Unreadable secret file.
    let missing = temp_file("missing", None);
    let m = missing.to_str().unwrap();
    let e = err(&[("PARALLEL_SECRET_FILE", m), ("PARALLEL_SECRET", "s")]);
    assert!(
        e.contains(&format!("PARALLEL_SECRET_FILE='{m}' is not valid"))
            && e.contains("reading it failed"),
        "{e}"
    );
    // A directory cannot be read as a file either.
    let dir = std::env::temp_dir();
    let e = err(&[("PARALLEL_SECRET_FILE", dir.to_str().unwrap())]);
    assert!(e.contains("reading it failed"), "{e}");
    // Empty file (a newline only is empty too).
    let empty = temp_file("empty", Some(b"\n"));
    let e = err(&[("PARALLEL_SECRET_FILE", empty.to_str().unwrap())]);
    assert!(e.contains("it is empty"), "{e}");
    // Blank path.
    assert!(err(&[("PARALLEL_SECRET_FILE", "")]).contains("PARALLEL_SECRET_FILE=''"));
    // A good file wins over PARALLEL_SECRET; its trailing newline is dropped.
    let good = temp_file("good", Some(b"from-file\r\n"));
    let c = with(&[
        ("PARALLEL_SECRET_FILE", good.to_str().unwrap()),
        ("PARALLEL_SECRET", "other"),
    ])
    .unwrap();
    assert_eq!(c.secret.as_deref(), Some(&b"from-file"[..]));
    // Both unset: authentication off.
    assert!(with(&[]).unwrap().secret.is_none());
    for p in [empty, good] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn config_2_launcher_rows_validate_their_kind() {
    let port = |text: &'static str| {
        check_row(&var::MASTER_PORT.var, &move |w: &Var| {
            (w.name == "MASTER_PORT").then(|| text.to_string())
        })
    };
    let e = port("99999").err().unwrap().to_string();
    assert!(
        e.contains("MASTER_PORT='99999' is not valid: expected a whole number from 1 to 65535"),
        "{e}"
    );
    assert!(e.contains("(default: 29500)"), "{e}");
    assert!(port(" 7 ").is_ok() && port("").is_ok());
    // Typed: a rank is a number, MASTER_PORT has its default, unset text is None.
    let rank: Option<u64> = parse_row(&var::RANK.var, &|w: &Var| {
        (w.name == "RANK").then(|| " 7 ".to_string())
    })
    .unwrap();
    assert_eq!(rank, Some(7));
    let port: u64 = parse_row(&var::MASTER_PORT.var, &|_| None).unwrap();
    assert_eq!(port, 29500);
    let addr: Option<String> = parse_row(&var::MASTER_ADDR.var, &|_| Some("  ".into())).unwrap();
    assert_eq!(addr, None);
}

#[test]
fn config_2_docs_environment_md_matches_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/environment.md");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        on_disk,
        render_markdown(),
        "docs/environment.md is stale: regenerate it (see its header)"
    );
}
