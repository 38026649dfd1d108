//! CONFIG-3 and CONFIG-4 in a real process: a malformed environment is a `Config` error at every
//! entry point, and nothing ever runs on defaults (issue 11, behaviour 1). The workers' entry
//! points: workers/tests/config_env.rs.
//!
//! The configuration is read once per process, so each case runs in a child process (this test
//! binary re-run with `--exact child --ignored`), with the environment under test.

use parallel_engine::{Client, ErrorKind, Server};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run_child(mode: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("PARALLEL_TEST_CONFIG_CHILD", mode)
    .env_remove("PARALLEL_SECRET")
    .env_remove("PARALLEL_SECRET_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn config_4_every_rust_entry_point_fails_with_config_error_next_to_a_secret() {
    let out = run_child(
        "entry-points",
        &[("PARALLEL_SHM_RING", "lots"), ("PARALLEL_SECRET", "s")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("entry points: 3 config errors"), "{stdout}");
}

#[test]
fn config_4_reaching_config_with_a_malformed_environment_aborts_instead_of_using_defaults() {
    let out = run_child("config", &[("PARALLEL_TIMEOUT", "soon")]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PARALLEL_TIMEOUT='soon' is not valid")
            && stderr.contains("refusing to run on defaults"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ran on defaults"),
        "{out:?}"
    );
}

#[allow(clippy::print_stdout)] // the child reports to its parent on stdout
fn say(line: &str) {
    println!("{line}");
}

/// The body of the child processes (run by the tests above).
#[test]
#[ignore = "run as a child process by the tests above"]
fn child() {
    #[allow(clippy::disallowed_methods)] // test-only: the parent passes the child's role
    let Ok(mode) = std::env::var("PARALLEL_TEST_CONFIG_CHILD") else {
        return;
    };
    let t0 = Instant::now();
    match mode.as_str() {
        "entry-points" => {
            let errors = [
                parallel_engine::config::try_config()
                    .map(|_| ())
                    .unwrap_err(),
                Server::bind("127.0.0.1", 0).map(|_| ()).unwrap_err(),
                Client::connect("127.0.0.1", 1, Some(Duration::from_secs(5)))
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
            assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
            say(&format!("entry points: {} config errors", errors.len()));
        }
        "config" => {
            let c = parallel_engine::config::config();
            say(&format!("ran on defaults: {:?}", c.timeout));
        }
        other => panic!("unknown child mode {other}"),
    }
}
