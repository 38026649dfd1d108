//! CONFIG-4 for the workers' entry points in a real process: with a malformed environment (next
//! to a secret), `map`, `Pool::new` and `HostQueue::open` fail with a `Config` error naming the
//! variable, and run nothing (the engine's own entry points: engine/tests/config_env.rs).
//!
//! The configuration is read once per process, so the case runs in a child process (this test
//! binary re-run with `--exact child --ignored`), with the environment under test.

use parallel_engine::ErrorKind;
use parallel_workers::{HostQueue, Pool, map};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn config_4_every_workers_entry_point_fails_with_config_error_next_to_a_secret() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PARALLEL_TEST_CONFIG_CHILD", "entry-points")
        .env_remove("PARALLEL_SECRET_FILE")
        .env("PARALLEL_SECRET", "s")
        .env("PARALLEL_SHM_RING", "lots")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("entry points: 3 config errors"), "{stdout}");
}

#[allow(clippy::print_stdout)] // the child reports to its parent on stdout
fn say(line: &str) {
    println!("{line}");
}

/// The body of the child process (run by the test above).
#[test]
#[ignore = "run as a child process by the test above"]
fn child() {
    #[allow(clippy::disallowed_methods)] // test-only: the parent passes the child's role
    let Ok(mode) = std::env::var("PARALLEL_TEST_CONFIG_CHILD") else {
        return;
    };
    assert_eq!(mode, "entry-points");
    let t0 = Instant::now();
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    let errors = [
        map(2, move |_| {
            r.store(true, std::sync::atomic::Ordering::SeqCst)
        })
        .map(|_| ())
        .unwrap_err(),
        Pool::new(2).map(|_| ()).unwrap_err(),
        HostQueue::open("config-env-test", Some(Duration::from_secs(5)))
            .map(|_| ())
            .unwrap_err(),
    ];
    for e in &errors {
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("PARALLEL_SHM_RING='lots' is not valid: expected a size"),
            "{text}"
        );
    }
    assert!(
        !ran.load(std::sync::atomic::Ordering::SeqCst),
        "map ran a worker"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    say(&format!("entry points: {} config errors", errors.len()));
}
